"""Build tiny local HF checkpoints (tokenizer, Llama/Qwen2 policies, Llama RM) for tests.

Usage: python tools/make_tiny_models.py --out DIR [--seed S] [--vocab-size N]
"""

import sys
from pathlib import Path

try:
    import rlmt_megatron  # noqa: F401
except ImportError:  # plain checkout, package not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlmt_megatron.testing.tiny_models import main

if __name__ == "__main__":
    main()
