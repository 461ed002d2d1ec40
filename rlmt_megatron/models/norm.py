"""RMSNorm with the exact numerics of HF Llama/Qwen2 and sequence-parallel support.

HF computes the statistic in float32, casts back, then scales by the weight; matching that order
keeps bf16 parity with transformers. Megatron's torch wrapper refuses sequence parallelism; here
the weight is tagged ``sequence_parallel`` so Megatron all-reduces its gradient across TP ranks
(each rank sees a different slice of the sequence).
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
