#!/usr/bin/env python3
"""Print the run directory (``run.out_dir``) that an rlmt-train recipe and its overrides resolve to.

    python launch/run_dir.py RECIPE.yaml [key=value ...]

The SLURM scripts call it before starting anything: it validates the whole config (a bad recipe
fails the job at once, with rlmt-train's one-line error and exit status 2), and the directory is
where the trainer writes ``exit_status.json``, from which the script decides to requeue
(``rlmt_megatron/trainer/stop.py``). A relative directory is printed as given (relative to the
directory the trainer starts in).
"""

from __future__ import annotations

import sys

from rlmt_megatron.cli.common import run_main


def main(argv: list[str]) -> None:
    from rlmt_megatron.config.rlmt import load_rlmt_config

    if not argv:
        print("usage: run_dir.py RECIPE.yaml [key=value ...]", file=sys.stderr)
        sys.exit(2)
    print(load_rlmt_config(argv[0], argv[1:]).run.out_dir)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
