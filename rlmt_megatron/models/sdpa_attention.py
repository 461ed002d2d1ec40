"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron-Core's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix
(an 8B-shaped stack OOMs an 80 GB H100 at 4x4096 tokens). SDPA picks a flash or memory-efficient
kernel that never does, handles GQA without repeating K/V (``enable_gqa``), and runs on CPU for
tests. Used by the local layer spec when Transformer Engine is absent.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Drop-in for Megatron's core attention: q [sq,b,np,hn], k/v [sk,b,ng,hn] -> [sq,b,np*hn]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPA core attention does not implement context parallelism")
        if config.window_size is not None:
            raise ValueError("SDPA core attention does not implement sliding-window attention")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed (THD) sequences need the Transformer Engine spec")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPA core attention")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, n_heads, head_dim = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is None:
            if mask_type != AttnMaskType.causal:
                raise ValueError(f"attention mask type {mask_type} needs an explicit mask")
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != n_heads,
            )
        else:
            # Megatron masks are True where attention is *forbidden*; SDPA's bool mask is the
            # opposite. A given mask already carries causality.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=self.dropout_p if self.training else 0.0,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != n_heads,
            )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, n_heads * head_dim)
