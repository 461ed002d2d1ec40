"""Build tiny local HF checkpoints (tokenizer, Llama/Qwen2 policies, Llama RM) for tests and demos.

    python tools/make_tiny_models.py --out DIR [--seed S] [--vocab-size N]

The builder is ``rlmt_megatron.testing.tiny_models`` (``python -m`` it, or call
``build_tiny_models``); this is its command line for a plain checkout.
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
