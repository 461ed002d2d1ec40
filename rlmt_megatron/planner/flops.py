"""Model FLOPs of a Llama-style decoder per token: the one count the dry run's step-time
projection (``planner/step_time.py``) and the benchmarks' MFU (``benchmarks/common.py``) share.
Pure arithmetic on the shape: no torch."""

from __future__ import annotations

from dataclasses import dataclass

from rlmt_megatron.models.hf_config import HFModelSpec


@dataclass(frozen=True)
class DecoderShape:
    """What the FLOP count needs of a Llama-style decoder. ``vocab`` is the output layer's width:
    the LM head's vocabulary, or 1 for a scalar head (reward model, critic)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_spec(cls, spec: HFModelSpec, head: str = "lm") -> "DecoderShape":
        """The shape of a parsed HF config; ``head="scalar"`` for a model with a 1-wide head."""
        return cls(spec.num_hidden_layers, spec.hidden_size, spec.intermediate_size, spec.num_attention_heads,
                   spec.num_key_value_heads, spec.head_dim, spec.vocab_size if head == "lm" else 1)

    def matmul_params(self) -> int:
        """Weights that take part in a matrix product per token: every linear layer and the output
        head (the embedding is a lookup; norms are elementwise)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn
        return self.layers * per_layer + self.hidden * self.vocab

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of forward+backward per token (backward = 2x forward), no recomputation
        counted: 6 per matmul weight, plus attention scores and the weighted sum (QK^T and AV,
        2 * 2 * seq * heads * head_dim forward per layer), halved for the causal mask (each
        token attends to the ones before it: counted once, as in the measured table of
        ARCHITECTURE.md)."""
        attention = 3 * 2 * 2 * seq_len * self.heads * self.head_dim * self.layers / 2
        return 6 * self.matmul_params() + attention

    def forward_flops_per_token(self, seq_len: int) -> float:
        return self.train_flops_per_token(seq_len) / 3
