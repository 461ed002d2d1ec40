"""Train and forward-only steps for one role, on Megatron-Core's own machinery.

- Forward/backward runs through ``get_forward_backward_func`` (no pipelining, 1F1B, or
  interleaved 1F1B when virtual PP is set) over token-budget micro-batches.
- Gradients live in Megatron DDP buffers; the (distributed) optimizer clips and steps;
  ``OptimizerParamScheduler`` drives the learning rate (constant, cosine, linear; warmup).

Loss normalisation is global: before the step the engine counts the loss tokens and sequences of
the *whole* global batch (all micro-batches, all DP ranks) and hands those counts to the loss
function, which returns each micro-batch's share of the global loss. Megatron is configured to
add the shares up as they are (``calculate_per_token_loss``, no division by the micro-batch
count, DP gradients summed, no rescaling in ``finalize_model_grads``), so the update does not
depend on how the batch was split into micro-batches or over DP ranks.

The reference policy is a second, frozen model with a forward-only engine rather than weights
swapped into the trained module: a swap would copy every weight twice per step and fight the
distributed optimizer's main-parameter copies, while the frozen model costs only its bf16
weights (offloadable later) and keeps both code paths trivially correct.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import torch

from rlmt_megatron.algorithms.aggregation import GlobalNormalizers
from rlmt_megatron.algorithms.checks import validated_on_host
from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
from rlmt_megatron.distributed.collectives import any_rank, broadcast_from_last_stage, dp_all_reduce
from rlmt_megatron.models.builder import BuiltModel
from rlmt_megatron.runner.batching import Sample, TrainMicroBatch, make_train_micro_batches


# loss_fn(model_output, micro_batch, global normalisers) -> (loss share, {metric: share of a global sum})
LossFn = Callable[[torch.Tensor, TrainMicroBatch, GlobalNormalizers], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def global_counts(samples: list[Sample]) -> tuple[GlobalNormalizers, int, int]:
    """Loss tokens and sequences with at least one loss token, summed over all DP ranks; plus
    the total number of samples and the fewest samples any DP rank holds."""
    masks = [s.fields["loss_mask"] for s in samples]
    tokens = sum(float(m.sum()) for m in masks)
    seqs = sum(1 for m in masks if m.sum() > 0)
    tokens, seqs, total = dp_all_reduce([tokens, seqs, len(samples)])
    (fewest,) = dp_all_reduce([len(samples)], op="min")
    return GlobalNormalizers(num_tokens=tokens, num_seqs=seqs), int(total), int(fewest)


def check_finite_fields(samples: list[Sample]) -> None:
    """Refuse NaN/inf in any sample field, and a ``loss_mask`` that is not 0/1, on every rank of
    the job at once.

    Checked on the host before the schedule starts: an error raised inside one rank's loss
    function would leave the other ranks waiting in a collective, and on a GPU the losses skip
    these value checks (``algorithms.checks.validated_on_host``) to avoid a stall per check.
    """
    def problem(name: str, t: torch.Tensor) -> Optional[str]:
        if name == "loss_mask" and t.dtype != torch.bool and not ((t == 0) | (t == 1)).all():
            return "is not 0/1"
        return "contains NaN/inf" if t.is_floating_point() and not torch.isfinite(t).all() else None

    bad = next(((i, name, why) for i, s in enumerate(samples) for name, t in s.fields.items()
                if (why := problem(name, t))), None)
    if not any_rank(bad is not None):
        return
    if bad is None:
        raise ValueError("a sample on another rank contains NaN/inf or a loss_mask that is not 0/1: "
                         "refusing to train on this batch")
    raise ValueError(f"field '{bad[1]}' of sample {bad[0]} on this rank {bad[2]}: refusing to train on this batch")


def _pad_for_interleaving(micro_batches: list[TrainMicroBatch], num_chunks: int) -> list[TrainMicroBatch]:
    """Interleaved 1F1B (virtual PP) in Megatron-Core 0.16 exchanges activations of one fixed
    shape and needs a multiple of PP micro-batches. So under virtual PP every micro-batch is
    padded to the largest [rows, width], and all-masked filler batches (zero loss, zero
    gradient; their results are dropped) top up the count."""
    from megatron.core import parallel_state

    if num_chunks == 1:
        return micro_batches
    rows = max(mb.input_ids.shape[0] for mb in micro_batches)
    width = max(mb.input_ids.shape[1] for mb in micro_batches)

    def padded(mb: TrainMicroBatch) -> TrainMicroBatch:
        b, s = mb.input_ids.shape
        ids = torch.zeros(rows, width, dtype=mb.input_ids.dtype)
        ids[:b, :s] = mb.input_ids
        fields = {}
        for k, v in mb.fields.items():
            fields[k] = torch.zeros(rows, width - 1, dtype=v.dtype)
            fields[k][:b, : s - 1] = v
        lengths = torch.full((rows,), width, dtype=mb.lengths.dtype)
        lengths[:b] = mb.lengths
        return TrainMicroBatch(ids, lengths, fields, mb.indices)

    out = [padded(mb) for mb in micro_batches]
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    filler = TrainMicroBatch(
        torch.zeros(rows, width, dtype=torch.long),
        torch.full((rows,), width),
        {k: torch.zeros(rows, width - 1, dtype=v.dtype) for k, v in out[0].fields.items()},
        [],
    )
    return out + [filler] * ((-len(out)) % pp)


class ModelRunner:
    """Owns a role's DDP-wrapped chunks, optimizer and LR schedule (or none: forward-only), and
    its micro-batching (``batching``: the training and forward-only token budgets; defaults
    when not given)."""

    def __init__(self, built: BuiltModel, optim: Optional[OptimConfig], batching: Optional[BatchingConfig] = None):
        self.built = built
        self.optim_config = optim
        self.batching = batching or BatchingConfig()
        self.step_count = 0
        if optim is None:  # forward-only (reference model, scoring); forward() runs under no_grad
            self.model = built.chunks
            self.optimizer = self.scheduler = None
            return
        self.model, self.optimizer, self.scheduler = self._setup_training(built, optim)

    @staticmethod
    def _setup_training(built: BuiltModel, optim: OptimConfig):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        config = built.chunks[0].config
        # Loss shares are already normalised by global counts: no averaging anywhere else.
        config.calculate_per_token_loss = True
        config.finalize_model_grads_func = lambda model, num_tokens, **kw: finalize_model_grads(model, None, **kw)
        if config.params_dtype == torch.float16:
            raise ValueError("float16 training needs a loss scaler, which is not wired up: use bfloat16")
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            check_for_nan_in_grad=True,  # raises before the optimizer step, never after
            overlap_grad_reduce=optim.overlap_grad_reduce,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        )
        model = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(built.chunks)
        ]
        if optim.overlap_grad_reduce:
            config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        dtype = config.params_dtype
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=optim.optimizer,
                sgd_momentum=optim.sgd_momentum,
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16,
                params_dtype=dtype,
                use_distributed_optimizer=optim.use_distributed_optimizer,
            ),
            model,
        )
        decay = {"constant": "constant", "cosine": "cosine", "linear": "linear"}[optim.lr_schedule]
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if optim.warmup_steps else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(optim.total_steps, optim.warmup_steps + 1),
            lr_decay_style=decay,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        # The scheduler's counter is the number of the step about to run (1-based), so step 1
        # of a warmup already trains at lr/warmup_steps instead of Megatron's lr=init_lr=0.
        scheduler.step(increment=1)
        return model, optimizer, scheduler

    # ------------------------------------------------------------------------------------------

    def _micro_batches(self, samples: list[Sample], max_tokens: int, unit_size: int = 1) -> list[TrainMicroBatch]:
        return make_train_micro_batches(samples, max_tokens, self.batching.max_samples_per_microbatch,
                                        self.built.sequence_multiple, unit_size)

    def _run(self, micro_batches: list[TrainMicroBatch], collect: Callable, forward_only: bool) -> Optional[list]:
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = next(self.built.chunks[0].parameters()).device
        real = len(micro_batches)
        # All inputs moved up front; on a GPU asynchronously from pinned memory, so the schedule
        # never waits on a host copy between micro-batches.
        micro_batches = [mb.to(device, non_blocking=device.type == "cuda")
                         for mb in _pad_for_interleaving(micro_batches, len(self.model))]

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output = model(mb.input_ids, mb.position_ids, None)
            return output, partial(collect, mb=mb)

        iterators = [iter(micro_batches) for _ in self.model]
        with validated_on_host():  # train_step validated every field on the host (forward has none)
            results = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=self.model if len(self.model) > 1 else self.model[0],
                num_microbatches=len(micro_batches),
                seq_length=max(int(mb.input_ids.shape[1]) for mb in micro_batches),
                micro_batch_size=max(int(mb.input_ids.shape[0]) for mb in micro_batches),
                forward_only=forward_only,
                collect_non_loss_data=forward_only,
            )
        return results[:real] if parallel_state.is_pipeline_last_stage() else None

    def train_step(self, samples: list[Sample], loss_fn: LossFn, unit_size: int = 1) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch. Collective over the role.

        ``unit_size``: runs of this many consecutive samples stay in one micro-batch (DPO pairs).

        Returns metrics summed over the global batch (the loss shares add up to the global loss),
        plus ``grad_norm`` and ``lr``. Raises ValueError, on every rank and before any update,
        for: an empty batch, a DP rank without samples, no loss token anywhere (``loss_mask``),
        NaN/inf in a sample field. A non-finite loss stops the step before backward; NaN/inf
        gradients are caught by Megatron DDP's check before the optimizer step.
        """
        if self.optimizer is None:
            raise RuntimeError("this engine is forward-only (built without an optimizer config)")
        counts, num_samples, fewest = global_counts(samples)
        if num_samples == 0:
            raise ValueError("empty batch: no samples on any data-parallel rank")
        if fewest == 0:
            raise ValueError("a data-parallel rank has no samples: give every DP rank at least one")
        if counts.num_tokens == 0:
            raise ValueError("every token of the global batch is masked out ('loss_mask' is all zero)")
        check_finite_fields(samples)
        micro_batches = self._micro_batches(samples, self.batching.train_tokens_per_microbatch, unit_size)
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        # Finiteness of each micro-batch loss is checked once after backward (one host sync per
        # step, not one per micro-batch); a NaN loss usually makes NaN gradients, which Megatron
        # DDP's check_for_nan_in_grad refuses first, also before the optimizer step.
        losses: list[tuple[torch.Tensor, list[int]]] = []

        def collect(output, mb):
            loss, metrics = loss_fn(output, mb, counts)
            losses.append((loss.detach(), mb.indices))
            metrics = {k: v.detach().float() for k, v in metrics.items()}
            metrics["loss"] = loss.detach().float()
            return loss, torch.tensor(1, dtype=torch.int), metrics

        results = self._run(micro_batches, collect, forward_only=False)
        if losses and not bool(torch.stack([torch.isfinite(l) for l, _ in losses]).all()):
            bad = [(float(l), idx) for l, idx in losses if not torch.isfinite(l)]
            raise ValueError(f"loss is {bad[0][0]} on micro-batch of samples {bad[0][1]}: refusing to update")
        metrics = self._reduce_metrics(results)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step applies
        ok, grad_norm, _ = self.optimizer.step()
        if not ok or grad_norm is None or not math.isfinite(grad_norm):  # fp16 loss-scale skip
            raise ValueError(f"gradient norm is {grad_norm}: the optimizer skipped the step")
        self.scheduler.step(increment=1)
        self.step_count += 1
        metrics.update(grad_norm=float(grad_norm), lr=lr)
        return metrics

    def _reduce_metrics(self, results: Optional[list]) -> dict[str, float]:
        """Sum per-micro-batch metric dicts over micro-batches and DP ranks; share over PP."""

        # Summed where the metrics live (the device) and copied to the host once: one sync,
        # not one per metric and micro-batch.
        results = results or []
        device = next((v.device for r in results for v in r.values() if torch.is_tensor(v)), torch.device("cpu"))
        sums: dict[str, torch.Tensor] = {}
        for r in results:
            for k, v in r.items():
                v = torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                sums[k] = sums[k] + v if k in sums else v
        names = sorted(sums)
        local: dict[str, float] = dict(zip(names, torch.stack([sums[k] for k in names]).cpu().tolist())) if names else {}
        local = broadcast_from_last_stage(local)
        keys = sorted(local)
        return dict(zip(keys, dp_all_reduce([local[k] for k in keys]))) if keys else local

    @torch.no_grad()
    def forward(self, samples: list[Sample], reduce: Callable[[torch.Tensor, TrainMicroBatch], list[Any]]) -> list[Any]:
        """Forward-only over ``samples`` in micro-batches of ``batching.logprob_tokens_per_microbatch``;
        ``reduce(output, mb)`` gives one result per sample of ``mb`` (``mb.indices``; rows past
        them are padding). Results come back in the order of ``samples`` on every rank of the
        pipeline.
        """
        if not samples:
            return []
        for chunk in self.model:
            chunk.eval()
        micro_batches = self._micro_batches(samples, self.batching.logprob_tokens_per_microbatch)
        per_batch = self._run(micro_batches, lambda output, mb, non_loss_data=True: reduce(output, mb), forward_only=True)
        per_batch = broadcast_from_last_stage(per_batch)
        out: dict[int, Any] = {}
        for mb, values in zip(micro_batches, per_batch):
            out.update(zip(mb.indices, values))
        return [out[i] for i in range(len(samples))]


def as_runner(model: "BuiltModel | ModelRunner") -> "ModelRunner":
    """A runner for forward-only passes: ``model`` itself (with its own batching), or a
    forward-only runner with the default batching around a BuiltModel."""
    return model if isinstance(model, ModelRunner) else ModelRunner(model, None)
