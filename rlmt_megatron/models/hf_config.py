"""Read an HF ``config.json`` into the few numbers a Megatron GPTModel needs.

Both config layouts found in the wild are accepted: transformers 4.x files (``rope_theta`` and
``rope_scaling`` at top level, as on the Llama 3.1 and Qwen2.5 hub repos) and transformers 5.x
files (``rope_parameters``). Anything we cannot reproduce exactly is rejected here rather than
silently computed differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlmt_megatron.errors import CheckpointError, UnsupportedArchitectureError

# model_type -> (family name in our tables, whether q/k/v projections carry a bias)
SUPPORTED_MODEL_TYPES: dict[str, dict[str, Any]] = {
    "llama": {"family": "llama", "qkv_bias": False},
    "qwen2": {"family": "qwen2", "qkv_bias": True},
}
# The heads we map (checkpoint/mapping.py); any other class name would load with the wrong head
# or none, silently, so config.json's ``architectures`` must list only these.
_HEADS = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": tuple("Llama" + h for h in _HEADS),
    "qwen2": tuple("Qwen2" + h for h in _HEADS),
}


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class HFModelSpec:
    """Shape and numerics of an HF decoder, independent of the head (LM or classifier)."""

    source: str  # path of the config.json, for error messages
    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[Llama3RopeScaling]
    tie_word_embeddings: bool
    qkv_bias: bool
    pad_token_id: Optional[int]
    raw: dict  # the full config.json, written back unchanged on export

    @property
    def family(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type]["family"]

    @property
    def is_sequence_classifier(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)


def _require(cfg: dict, key: str, source: str, kind: type = int):
    if key not in cfg:
        raise CheckpointError(f"{source}: field '{key}' is missing (expected {kind.__name__})")
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(
            f"{source}: field '{key}' is {value!r}, expected {kind.__name__}"
        )
    return value


def _rope(cfg: dict, source: str) -> tuple[float, Optional[Llama3RopeScaling]]:
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else scaling
    else:
        theta = cfg.get("rope_theta", 10000.0)
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(
            f"{source}: rope scaling type '{rope_type}' is not supported (supported: llama3)"
        )
    try:
        return float(theta), Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: rope scaling 'llama3' is missing field {e}") from None


def parse_hf_config(cfg: dict, source: str = "<config>") -> HFModelSpec:
    """Validate ``cfg`` (a parsed config.json) and return its spec."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{source}: model_type '{model_type}' (architectures {cfg.get('architectures')}) is not "
            f"supported; supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))} "
            "(Llama/Qwen2 *ForCausalLM, *ForSequenceClassification, *ForTokenClassification)"
        )
    architectures = cfg.get("architectures") or []
    if not isinstance(architectures, list):
        raise CheckpointError(f"{source}: field 'architectures' is {architectures!r}, expected a list of class names")
    for arch in architectures:
        if arch not in SUPPORTED_ARCHITECTURES[model_type]:
            raise UnsupportedArchitectureError(
                f"{source}: architecture '{arch}' is not supported for model_type '{model_type}'; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES[model_type])}"
            )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"{source}: hidden_act '{cfg['hidden_act']}' is not supported (silu only)")
    if model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise UnsupportedArchitectureError(f"{source}: Llama with attention_bias/mlp_bias is not supported")
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        raise UnsupportedArchitectureError(f"{source}: Qwen2 with use_sliding_window=true is not supported")
    heads = _require(cfg, "num_attention_heads", source)
    hidden = _require(cfg, "hidden_size", source)
    head_dim = cfg.get("head_dim") or hidden // heads
    theta, scaling = _rope(cfg, source)
    spec = HFModelSpec(
        source=source,
        model_type=model_type,
        architectures=tuple(cfg.get("architectures") or ()),
        vocab_size=_require(cfg, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_require(cfg, "intermediate_size", source),
        num_hidden_layers=_require(cfg, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=int(head_dim),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=float(_require(cfg, "rms_norm_eps", source, float)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=SUPPORTED_MODEL_TYPES[model_type]["qkv_bias"],
        pad_token_id=cfg.get("pad_token_id"),
        raw=cfg,
    )
    if spec.num_attention_heads % spec.num_key_value_heads != 0:
        raise CheckpointError(
            f"{source}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={spec.num_key_value_heads}"
        )
    return spec


def load_hf_config(model_dir: str | Path) -> HFModelSpec:
    """Read ``model_dir/config.json`` with errors that name the file."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (expected an HF model folder)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an HF model folder needs config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object at top level")
    return parse_hf_config(cfg, str(path))
