"""Runs ``rlmt-convert`` (its real ``main``) several times in one job: each argument is one
command line, e.g. ``"hf-to-mcore --hf A --out B --tp 2 --pp 2"``. One job pays Python's and
Megatron's start-up once instead of once per model.

Each conversion builds and tears down its own Megatron groups, as separate CLI runs would; only
the torch.distributed process group is kept between them (gloo cannot be re-initialised in the
same torchrun job: the rendezvous keys of the first group are still in the store)."""

import shlex
import sys

from megatron.core import parallel_state

from rlmt_megatron.cli.convert import main
from rlmt_megatron.distributed import bootstrap


def _destroy_megatron_groups_only() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    shutdown, bootstrap.shutdown = bootstrap.shutdown, _destroy_megatron_groups_only
    for command in sys.argv[1:]:
        main(shlex.split(command))
    shutdown()
