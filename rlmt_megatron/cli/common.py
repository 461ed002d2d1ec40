"""What every rlmt CLI shares: layout flags, distributed start/stop, and user-facing errors.

Under torchrun each CLI runs SPMD with the requested TP x PP (data parallel = the rest); as a
plain process it is a world of one. Errors in the user's input (RLMTError) print one line and
exit with status 2 instead of a traceback from deep inside Megatron.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig, PrecisionConfig
from rlmt_megatron.errors import RLMTError


def add_layout_args(parser: argparse.ArgumentParser,
                    dtype_help: str = "compute dtype (default: float32 on CPU, bfloat16 on GPU)") -> None:
    g = parser.add_argument_group("parallel layout")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    g.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (default off)")
    g.add_argument("--sequence-parallel", action="store_true", help="shard activations along the sequence (tp > 1)")
    g.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None,
        help=dtype_help,
    )


def build_config_from_args(args: argparse.Namespace) -> ModelBuildConfig:
    import torch

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    return ModelBuildConfig(
        parallel=ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp, sequence_parallel=args.sequence_parallel),
        precision=PrecisionConfig(params_dtype=dtype),
    )


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def quiet_libraries() -> None:
    """Megatron warns at import about optional fused kernels; CLIs show only rank 0's own lines."""
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*(Apex|Transformer Engine).*")
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    # Megatron-FSDP's import-time notices ("Using Megatron-FSDP without Transformer Engine",
    # "Detected Megatron Core ...") repeat on every command although FSDP is never used here.
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)


@contextlib.contextmanager
def cli_session(parallel: ParallelConfig, seed: int = 1234) -> Iterator[int]:
    """Start distributed + Megatron for ``parallel``; yield the DP size; always shut down."""
    from rlmt_megatron.distributed import bootstrap

    try:
        yield bootstrap.initialize(parallel, seed=seed)
    finally:
        bootstrap.shutdown()


def run_main(main, argv=None) -> None:
    """Call ``main(argv)``; report RLMTError as one line on stderr and exit 2."""
    quiet_libraries()
    try:
        main(argv)
    except RLMTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
