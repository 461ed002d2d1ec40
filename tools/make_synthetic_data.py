"""Write the bundled data sets in examples/data (synthetic prompts, SFT thinking traces).

    python tools/make_synthetic_data.py [--out examples/data] [--seed 0] [--sft-rows 64]

The builder is ``rlmt_megatron.testing.demo_data`` (``--set bundled``), which also writes the CPU
demo's sets; this is its command line for the committed files.
"""

import sys
from pathlib import Path

try:
    import rlmt_megatron  # noqa: F401
except ImportError:  # plain checkout, package not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlmt_megatron.testing import demo_data


def main(argv=None) -> None:
    demo_data.main(["--set", "bundled", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
