"""``rlmt-train CONFIG --dry-run``: check a recipe's layouts and estimate GPU memory per rank,
without a GPU, torch.distributed or model weights. What is estimated, from what, and what is
measured or assumed: ``docs/dry_run.md``.

- ``model_shapes``: model folders or names -> shapes; parameter counts, activation and KV bytes
  per token;
- ``rank_layout``: Megatron's rank groups, the layout checks, where the rollout engine runs;
- ``run_plan``: the options, and what every estimate is computed from (models, placement, tokens);
- ``memory``: the memory lines of one pipeline stage in every phase of a step;
- ``report``: the report, its verdict and advice, and ``run_dry_run`` (what ``rlmt-train`` calls).
"""
