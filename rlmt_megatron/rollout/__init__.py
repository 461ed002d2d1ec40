"""Rollout engines (generation) and weight sync from the trainer to them."""
