"""rlmt-sft and rlmt-train-rm: the supervised stages (SFT warm-start; reward model on preferences).

    rlmt-sft examples/sft_tiny.yaml epochs=2
    rlmt-train-rm examples/rm_tiny.yaml data=[prefs.jsonl]

Fields: ``SupervisedConfig`` in ``rlmt_megatron/trainer/supervised.py``. The trained model is
written to ``out_dir/hf`` as an HF folder.
"""

from __future__ import annotations

import argparse

from rlmt_megatron.cli.common import run_main


def _main(kind: str, prog: str, argv=None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    args = p.parse_args(argv)

    from rlmt_megatron.distributed.bootstrap import shutdown
    from rlmt_megatron.distributed.collectives import is_rank0
    from rlmt_megatron.config.base import load_config
    from rlmt_megatron.trainer.supervised import SupervisedConfig, run_supervised

    cfg = load_config(args.config, args.overrides, cls=SupervisedConfig)
    try:
        out = run_supervised(cfg, kind)
        if is_rank0():
            print(f"{prog} finished: {out}")
    finally:
        shutdown()


def sft_cli() -> None:
    run_main(lambda argv: _main("sft", "rlmt-sft", argv))


def rm_cli() -> None:
    run_main(lambda argv: _main("reward_model", "rlmt-train-rm", argv))


if __name__ == "__main__":
    import sys

    kind = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ("sft", "rm") else "sft"
    (sft_cli if kind == "sft" else rm_cli)()
