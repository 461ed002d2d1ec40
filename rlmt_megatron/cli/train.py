"""rlmt-train: RLMT (GRPO, PPO or on-policy DPO) from a YAML recipe plus key=value overrides.

    rlmt-train examples/demo/grpo.yaml models.policy=SFT_DIR models.reward=RM_DIR "data.prompts=[p.jsonl]"
    torchrun --nproc-per-node 8 -m rlmt_megatron.cli.train examples/rlmt/grpo_llama3.1-8b-instruct_think.yaml

Every field, its default and meaning: ``rlmt_megatron/trainer/config.py`` and ``docs/rlmt_train.md``.
"""

from __future__ import annotations

import argparse

from rlmt_megatron.cli.common import run_main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rlmt-train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)

    from rlmt_megatron.trainer.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    from rlmt_megatron.distributed.bootstrap import shutdown
    from rlmt_megatron.distributed.collectives import is_rank0
    from rlmt_megatron.trainer.loop import train

    try:
        out = train(cfg)
        if is_rank0():
            print(f"run finished: {out}")
    finally:
        shutdown()


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
