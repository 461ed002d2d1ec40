"""Forward-only passes over a (possibly pipelined) Megatron model.

Sequences of different lengths are right-padded into micro-batches under a token budget and run
through Megatron's own schedule (``get_forward_backward_func`` with ``forward_only=True``), so the
same code path serves PP=1, PP>1 and interleaved PP. Right padding with causal attention needs no
attention mask: padded positions come after every real token and cannot influence it.

The last pipeline stage turns each micro-batch's output into per-sequence results with a
``reduce`` callback; :func:`broadcast_from_last_stage` shares them with the other stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from rlmt_megatron.models.builder import BuiltModel


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, s] right-padded
    lengths: torch.Tensor  # [b] real lengths
    indices: list[int]  # positions of these sequences in the caller's list

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.input_ids.shape
        return torch.arange(s, device=self.input_ids.device).unsqueeze(0).expand(b, s)


def make_micro_batches(
    sequences: Sequence[Sequence[int]],
    max_tokens: int,
    pad_id: int = 0,
    device: Optional[torch.device] = None,
    pad_multiple: int = 1,
) -> list[MicroBatch]:
    """Group sequences, in order, into right-padded batches of at most ``max_tokens`` padded tokens.

    A sequence longer than the budget gets a batch of its own (it must run somehow). Widths are
    rounded up to ``pad_multiple`` (sequence parallelism splits the sequence over TP ranks; see
    ``BuiltModel.sequence_multiple``).
    """
    batches: list[MicroBatch] = []
    current: list[int] = []
    longest = 0

    def flush():
        if not current:
            return
        width = -(-max(len(sequences[i]) for i in current) // pad_multiple) * pad_multiple
        ids = torch.full((len(current), width), pad_id, dtype=torch.long)
        for row, i in enumerate(current):
            ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i], dtype=torch.long)
        lengths = torch.tensor([len(sequences[i]) for i in current], dtype=torch.long)
        batches.append(MicroBatch(ids.to(device) if device else ids, lengths.to(device) if device else lengths, list(current)))

    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"sequence {i} is empty")
        new_longest = max(longest, len(seq))
        if current and new_longest * (len(current) + 1) > max_tokens:
            flush()
            current, longest = [], 0
            new_longest = len(seq)
        current.append(i)
        longest = new_longest
    flush()
    return batches


def run_forward_only(
    built: BuiltModel,
    micro_batches: list[MicroBatch],
    reduce: Callable[[torch.Tensor, MicroBatch], Any],
) -> Optional[list[Any]]:
    """Run every micro-batch forward; on the last stage return ``reduce(output, mb)`` per batch.

    ``output`` is the last stage's [b, s, V/tp] logits (policy) or [b, s, 1] head output.
    Returns None on other pipeline stages.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in built.chunks:
        chunk.eval()

    device = next(built.chunks[0].parameters()).device

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        if mb.input_ids.device != device:
            mb = MicroBatch(mb.input_ids.to(device), mb.lengths.to(device), mb.indices)
        output = model(mb.input_ids, mb.position_ids, None)

        def collect(output_tensor, non_loss_data=True):
            return reduce(output_tensor, mb)

        return output, collect

    for mb in micro_batches:
        if mb.input_ids.shape[1] % built.sequence_multiple:
            raise ValueError(
                f"micro-batch width {mb.input_ids.shape[1]} is not a multiple of {built.sequence_multiple} "
                "(sequence parallelism): build micro-batches with pad_multiple=built.sequence_multiple"
            )
    real = len(micro_batches)
    micro_batches = _pad_for_interleaving(micro_batches, len(built.chunks))
    iterators = [iter(micro_batches) for _ in built.chunks]
    seq = max(int(mb.input_ids.shape[1]) for mb in micro_batches)
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=built.chunks if len(built.chunks) > 1 else built.chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=max(int(mb.input_ids.shape[0]) for mb in micro_batches),
            forward_only=True,
            collect_non_loss_data=True,
        )
    return results[:real] if parallel_state.is_pipeline_last_stage() else None


def _pad_for_interleaving(micro_batches: list[MicroBatch], num_chunks: int) -> list[MicroBatch]:
    """Interleaved 1F1B needs the micro-batch count to be a multiple of the PP size; top up
    with one-token batches whose results are dropped (they cost one tiny forward each)."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if num_chunks == 1 or len(micro_batches) % pp == 0:
        return micro_batches
    missing = pp - len(micro_batches) % pp
    width = parallel_state.get_tensor_model_parallel_world_size()  # valid under sequence parallelism too
    filler = MicroBatch(torch.zeros(1, width, dtype=torch.long), torch.ones(1, dtype=torch.long), [])
    return micro_batches + [filler] * missing


def broadcast_from_last_stage(obj: Any) -> Any:
    """Send a picklable object from the last pipeline stage to every stage of this pipeline."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(
        box,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return box[0]


# ----------------------------------------------------------------------------------------------
# The two reductions the tools and the trainer need.


def sequence_logprobs(built: BuiltModel, micro_batches: list[MicroBatch], temperature: float = 1.0) -> list[torch.Tensor]:
    """Per sequence, log p(token_t | tokens_<t) for t = 1..len-1 (float32), on every rank."""
    from rlmt_megatron.training.logprobs import vocab_parallel_logprobs

    def reduce(logits, mb: MicroBatch):
        lp = vocab_parallel_logprobs(logits[:, :-1], mb.input_ids[:, 1:], built.spec.vocab_size, temperature)
        return [lp[row, : int(n) - 1].cpu() for row, n in enumerate(mb.lengths)]

    return _ordered(micro_batches, broadcast_from_last_stage(run_forward_only(built, micro_batches, reduce)))


def sequence_scores(built: BuiltModel, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
    """Reward model: the head's output at each sequence's last real token (float32 scalar)."""

    def reduce(out, mb: MicroBatch):
        rows = torch.arange(out.shape[0], device=out.device)
        return list(out[rows, mb.lengths - 1, 0].float().cpu())

    return _ordered(micro_batches, broadcast_from_last_stage(run_forward_only(built, micro_batches, reduce)))


def token_values(built: BuiltModel, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
    """Critic: one value per token of each sequence (float32 [len])."""

    def reduce(out, mb: MicroBatch):
        return [out[row, : int(n), 0].float().cpu() for row, n in enumerate(mb.lengths)]

    return _ordered(micro_batches, broadcast_from_last_stage(run_forward_only(built, micro_batches, reduce)))


def _ordered(micro_batches: list[MicroBatch], per_batch: list[list]) -> list:
    out: dict[int, Any] = {}
    for mb, values in zip(micro_batches, per_batch):
        out.update(zip(mb.indices, values))
    return [out[i] for i in sorted(out)]
