"""Test doubles that tests and benchmarks share (never selected by a training config)."""
