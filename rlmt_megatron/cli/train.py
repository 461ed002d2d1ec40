"""rlmt-train: RLMT (GRPO, PPO or on-policy DPO) from a YAML recipe plus key=value overrides.

    rlmt-train examples/demo/grpo.yaml models.policy=SFT_DIR models.reward=RM_DIR "data.prompts=[p.jsonl]"
    torchrun --nproc-per-node 8 -m rlmt_megatron.cli.train examples/rlmt/1node/grpo_llama3.1-8b-instruct_think.yaml
    rlmt-train examples/rlmt/4nodes/grpo_qwen2.5-7b-base_think.yaml --dry-run --nodes 4   # layout, memory, step time; no GPU

Every field, its default and meaning: ``rlmt_megatron/config/rlmt.py`` and ``docs/rlmt_train.md``.
"""

from __future__ import annotations

import argparse

from rlmt_megatron.cli.common import run_main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rlmt-train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the parallel layout of every role and engine, a GPU memory "
                        "estimate per rank and a step-time projection per phase, then exit (no GPU needed); exit "
                        "status 2 if it cannot fit")
    d = p.add_argument_group("dry run (rlmt_megatron/planner/, docs/dry_run.md)")
    d.add_argument("--nodes", type=int, default=1, help="nodes of the job, engine nodes included (default 1)")
    d.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    d.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    d.add_argument("--assume-shape", action="append", default=[], metavar="[ROLE=]NAME",
                   help="shape of a model whose folder is not here: llama3.1-8b or qwen2.5-7b; a bare NAME is "
                        "the policy's (reference and critic follow it), reward=NAME the reward model's; repeatable")
    d.add_argument("--engine-dp", type=int, default=1,
                   help="replicas inside each SGLang engine (the server's --dp-size; default 1): an engine takes "
                   "engine_tp_size x this GPUs of one node, rollout.engines engines in all; SGLang takes weights "
                   "from disk only with replicas")
    d.add_argument("--engine-mem-fraction", type=float, default=None,
                   help="SGLang's --mem-fraction-static, if fixed (default: the KV cache gets what is left)")
    d.add_argument("--rate", action="append", default=[], metavar="NAME=VALUE",
                   help="override a rate of the step-time projection (planner/step_rates.py RATES, e.g. "
                   "gen_tokens_per_s_per_gpu=3000, train_mfu=0.35); repeatable")
    args = p.parse_intermixed_args(argv)  # overrides may follow the flags: CONFIG --dry-run key=value

    from rlmt_megatron.config.base import dump_config
    from rlmt_megatron.config.rlmt import load_rlmt_config

    cfg = load_rlmt_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    if args.dry_run:
        from rlmt_megatron.planner.report import DryRunOptions, run_dry_run

        run_dry_run(cfg, DryRunOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                       gpu_mem_gib=args.gpu_mem_gib, assume_shapes=args.assume_shape,
                                       engine_dp=args.engine_dp, engine_mem_fraction=args.engine_mem_fraction,
                                       rates=args.rate))
        return
    from rlmt_megatron.trainer.preflight import check_inputs

    # before any import of Megatron or model build: a missing file fails in a second, not after
    # every role is built (the dry run above plans from model names, which need not be folders)
    check_inputs(cfg)
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
