"""Declarative HF <-> Megatron-Core parameter tables.

Each Megatron parameter is described by one :class:`Rule`: the HF tensors it is made of, how they
are fused, and along which dimension Megatron splits it across tensor-parallel ranks. Loading and
exporting are both driven by these tables (see ``hf_loader`` and ``hf_export``); there are no
name regexes anywhere else.

Fusing is defined per TP rank, which makes the two non-trivial cases uniform: every HF part is
split into ``tp`` equal chunks along ``tp_dim`` and rank r's Megatron tensor is
``fuse(chunk_r(part_1), chunk_r(part_2), ...)``.

- ``qkv``: Megatron's ``linear_qkv`` is laid out per query group: for each KV head g, the
  ``heads/kv_heads`` query heads of g, then k_g, then v_g. Splitting by whole groups per rank is
  what makes chunk-then-fuse equal to Megatron's sharding.
- ``gate_up``: ``linear_fc1`` holds [gate_r; up_r] on each rank (not gate and up of the full
  tensor concatenated), so chunk-then-concatenate is exact here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

Fuse = Literal["copy", "qkv", "gate_up"]


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # HF names; '{i}' is the global layer index
    fuse: Fuse = "copy"
    tp_dim: Optional[int] = None  # None: replicated on every TP rank
    vocab: bool = False  # rows are the (padded) vocabulary


# Parameters inside ``decoder.layers.{i}.``, keyed by the Megatron name suffix. The two norm
# names of the Transformer Engine spec (norms fused into the next linear) sit beside the local
# spec's; whichever the built model has is used.
_LAYER_RULES: dict[str, Rule] = {
    "input_layernorm.weight": Rule(("model.layers.{i}.input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": Rule(("model.layers.{i}.input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": Rule(
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
        fuse="qkv",
        tp_dim=0,
    ),
    "self_attention.linear_proj.weight": Rule(("model.layers.{i}.self_attn.o_proj.weight",), tp_dim=1),
    "pre_mlp_layernorm.weight": Rule(("model.layers.{i}.post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": Rule(("model.layers.{i}.post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": Rule(
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        fuse="gate_up",
        tp_dim=0,
    ),
    "mlp.linear_fc2.weight": Rule(("model.layers.{i}.mlp.down_proj.weight",), tp_dim=1),
}

_QKV_BIAS_RULES: dict[str, Rule] = {
    "self_attention.linear_qkv.bias": Rule(
        (
            "model.layers.{i}.self_attn.q_proj.bias",
            "model.layers.{i}.self_attn.k_proj.bias",
            "model.layers.{i}.self_attn.v_proj.bias",
        ),
        fuse="qkv",
        tp_dim=0,
    ),
}

_EMBEDDING = Rule(("model.embed_tokens.weight",), tp_dim=0, vocab=True)

# Parameters outside the layers, per role. The critic exports as HF *ForTokenClassification
# (num_labels=1): a per-token scalar head named ``score``, as verl and OpenRLHF critics are saved.
_TOP_RULES: dict[str, dict[str, Rule]] = {
    "policy": {
        "embedding.word_embeddings.weight": _EMBEDDING,
        "decoder.final_layernorm.weight": Rule(("model.norm.weight",)),
        "output_layer.weight": Rule(("lm_head.weight",), tp_dim=0, vocab=True),
    },
    "reward": {
        "embedding.word_embeddings.weight": _EMBEDDING,
        "decoder.final_layernorm.weight": Rule(("model.norm.weight",)),
        "output_layer.weight": Rule(("score.weight",)),
    },
    "critic": {
        "embedding.word_embeddings.weight": _EMBEDDING,
        "decoder.final_layernorm.weight": Rule(("model.norm.weight",)),
        "output_layer.weight": Rule(("score.weight",)),
        "output_layer.bias": Rule(("score.bias",)),
    },
}

# HF architecture class written on export, per (family, role).
HF_ARCHITECTURES: dict[tuple[str, str], str] = {
    ("llama", "policy"): "LlamaForCausalLM",
    ("llama", "reward"): "LlamaForSequenceClassification",
    ("llama", "critic"): "LlamaForTokenClassification",
    ("qwen2", "policy"): "Qwen2ForCausalLM",
    ("qwen2", "reward"): "Qwen2ForSequenceClassification",
    ("qwen2", "critic"): "Qwen2ForTokenClassification",
}

_LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class ResolvedRule:
    """A rule with its layer index filled in: exact HF names for one Megatron parameter."""

    mcore_name: str
    hf_names: tuple[str, ...]
    rule: Rule


def resolve(mcore_name: str, global_layer: Optional[int], role: str, qkv_bias: bool, tied: bool) -> ResolvedRule:
    """Find the rule for a Megatron parameter name (local layer numbering inside a chunk).

    ``global_layer`` is the HF layer index of the chunk's layer (Megatron numbers layers from 0
    in every pipeline chunk). ``tied``: the policy's output layer is the embedding.
    """
    if mcore_name.startswith(_LAYER_PREFIX):
        suffix = mcore_name[len(_LAYER_PREFIX):].split(".", 1)[1]
        rule = _LAYER_RULES.get(suffix) or (_QKV_BIAS_RULES.get(suffix) if qkv_bias else None)
        if rule is None:
            raise KeyError(f"no HF mapping for Megatron parameter '{mcore_name}'")
        return ResolvedRule(mcore_name, tuple(n.format(i=global_layer) for n in rule.hf), rule)
    rule = _TOP_RULES[role].get(mcore_name)
    if rule is None:
        raise KeyError(f"no HF mapping for Megatron parameter '{mcore_name}' (role {role})")
    if tied and mcore_name == "output_layer.weight":
        rule = _EMBEDDING
    return ResolvedRule(mcore_name, rule.hf, rule)


def layer_index(mcore_name: str) -> Optional[int]:
    """Local (per-chunk) layer index of a ``decoder.layers.N.`` name, else None."""
    if not mcore_name.startswith(_LAYER_PREFIX):
        return None
    return int(mcore_name[len(_LAYER_PREFIX):].split(".", 1)[0])


# ----------------------------------------------------------------------------------------------
# Fuse / unfuse of one TP rank's chunks.


def fuse(kind: Fuse, parts: list[torch.Tensor], heads: int, kv_heads: int) -> torch.Tensor:
    """Combine one TP rank's chunks of the HF parts into that rank's Megatron tensor.

    ``heads``/``kv_heads`` are this rank's counts (global counts divided by tp).
    """
    if kind == "copy":
        (only,) = parts
        return only
    if kind == "gate_up":
        return torch.cat(parts, dim=0)
    q, k, v = parts
    per_group = heads // kv_heads
    tail = q.shape[1:]
    q = q.reshape(kv_heads, per_group * (q.shape[0] // heads), *tail)
    k = k.reshape(kv_heads, k.shape[0] // kv_heads, *tail)
    v = v.reshape(kv_heads, v.shape[0] // kv_heads, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def unfuse(kind: Fuse, tensor: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """Inverse of :func:`fuse` for one TP rank's tensor."""
    if kind == "copy":
        return [tensor]
    if kind == "gate_up":
        return list(tensor.chunk(2, dim=0))
    per_group = heads // kv_heads
    tail = tensor.shape[1:]
    grouped = tensor.reshape(kv_heads, (per_group + 2) * head_dim, *tail)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *tail) for t in (q, k, v)]
