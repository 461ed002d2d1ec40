"""Training samples and token-budget micro-batches.

A :class:`Sample` is one sequence of ``L`` tokens plus per-action fields of length ``L - 1``:
action ``t`` is token ``t + 1`` predicted from tokens ``<= t``. Loss masks, old/reference
logprobs, advantages, returns and old values all use this alignment, so every loss reads
``field[:, t]`` next to the model output at position ``t``.

Micro-batches are built by a token budget (dynamic batching): samples are sorted by length and
packed greedily so padding stays small, and no micro-batch holds more than
``max_tokens`` padded tokens (a longer sample gets a micro-batch of its own). Padding-free packing
of several sequences into one row needs variable-length attention (THD, Transformer Engine); with
the SDPA spec we use right padding, which needs no mask under causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L] long
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # each [L - 1]

    def __post_init__(self):
        n = self.input_ids.numel()
        if n < 2:
            raise ValueError(f"a training sample needs at least 2 tokens, got {n}")
        for name, t in self.fields.items():
            if t.shape != (n - 1,):
                raise ValueError(f"sample field '{name}' has shape {tuple(t.shape)}, expected ({n - 1},) for {n} tokens")


@dataclass
class TrainMicroBatch:
    input_ids: torch.Tensor  # [b, s] right-padded
    lengths: torch.Tensor  # [b]
    fields: dict[str, torch.Tensor]  # each [b, s - 1], zero-padded
    indices: list[int]

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.input_ids.shape
        return torch.arange(s, device=self.input_ids.device).unsqueeze(0).expand(b, s)

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    def to(self, device, non_blocking: bool = False) -> "TrainMicroBatch":
        """On ``device``. ``non_blocking`` (GPU targets): copied from pinned host memory without
        waiting, so queueing the copies does not stall the GPU work already in flight."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if non_blocking and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

        return TrainMicroBatch(move(self.input_ids), move(self.lengths), {k: move(v) for k, v in self.fields.items()},
                               self.indices)


def _collate(samples: list[Sample], indices: list[int], pad_multiple: int) -> TrainMicroBatch:
    width = max(samples[i].input_ids.numel() for i in indices)
    width = -(-width // pad_multiple) * pad_multiple
    ids = torch.zeros(len(indices), width, dtype=torch.long)
    names = samples[indices[0]].fields.keys()
    fields = {k: torch.zeros(len(indices), width - 1, dtype=samples[indices[0]].fields[k].dtype) for k in names}
    for row, i in enumerate(indices):
        s = samples[i]
        n = s.input_ids.numel()
        ids[row, :n] = s.input_ids
        if s.fields.keys() != names:
            raise ValueError(f"sample {i} has fields {sorted(s.fields)}, sample {indices[0]} has {sorted(names)}")
        for k, v in s.fields.items():
            fields[k][row, : n - 1] = v
    lengths = torch.tensor([samples[i].input_ids.numel() for i in indices])
    return TrainMicroBatch(ids, lengths, fields, list(indices))


def make_train_micro_batches(
    samples: list[Sample],
    max_tokens: int,
    max_samples: Optional[int] = None,
    pad_multiple: int = 1,
    unit_size: int = 1,
) -> list[TrainMicroBatch]:
    """Sort by length (longest first) and pack greedily under ``max_tokens`` padded tokens.

    ``unit_size`` > 1 keeps each run of that many consecutive samples together and in order
    (DPO: chosen then rejected must meet in one micro-batch).
    """
    if not samples:
        raise ValueError("empty batch: no samples to train on")
    if len(samples) % unit_size:
        raise ValueError(f"{len(samples)} samples do not split into units of {unit_size}")
    units = [list(range(k, k + unit_size)) for k in range(0, len(samples), unit_size)]
    # widths as collated (rounded up for sequence parallelism), so the budget holds exactly
    width = [-(-max(samples[i].input_ids.numel() for i in u) // pad_multiple) * pad_multiple for u in units]
    order = sorted(range(len(units)), key=lambda u: (-width[u], u))
    groups: list[list[int]] = []  # unit indices; longest first, so a group's first is widest
    for u in order:
        if groups:
            g = groups[-1]
            rows = (len(g) + 1) * unit_size
            if width[g[0]] * rows <= max_tokens and (max_samples is None or rows <= max_samples):
                g.append(u)
                continue
        groups.append([u])
    return [_collate(samples, [i for u in g for i in units[u]], pad_multiple) for g in groups]


def samples_from_sequences(sequences: Sequence[Sequence[int]]) -> list[Sample]:
    """Field-less samples for forward-only passes; every sequence needs at least 2 tokens (one
    to predict from, one predicted)."""
    out = []
    for i, seq in enumerate(sequences):
        if len(seq) < 2:
            raise ValueError(f"sequence {i} has {len(seq)} token(s); at least 2 are needed")
        out.append(Sample(torch.as_tensor(list(seq), dtype=torch.long)))
    return out
