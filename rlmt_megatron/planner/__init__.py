"""``rlmt-train CONFIG --dry-run``: check a recipe's layouts, place its rollout engines, estimate
GPU memory per rank and project the step time per phase, without a GPU, torch.distributed or
model weights. What is estimated, from what, and what is measured or assumed: ``docs/dry_run.md``.

- ``model_shapes``: model folders or names -> shapes; parameter counts, activation and KV bytes
  per token;
- ``rank_layout``: Megatron's rank groups, the layout checks, the engine's TP against the heads;
- ``engine_layout``: each rollout engine's node and GPUs, the trainer's world that is left;
- ``run_plan``: the options, and what every estimate is computed from (models, placement, tokens);
- ``memory``: the memory lines of one pipeline stage in every phase of a step;
- ``flops``: model FLOPs per token of a decoder (shared with ``benchmarks/``);
- ``step_rates``: the rates the projection divides by, each with its source (one table);
- ``step_time``: seconds per phase, the step synchronous and asynchronous;
- ``report``: the report, its verdict and advice, and ``run_dry_run`` (what ``rlmt-train`` calls).
"""
