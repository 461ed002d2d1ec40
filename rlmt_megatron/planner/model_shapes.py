"""Model shapes for the dry run, and what follows from a shape alone: parameters per rank,
activation bytes per token, KV-cache bytes per token, engine weight bytes (``docs/dry_run.md``:
where shapes come from, and every formula)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.models.builder import padded_vocab_size
from rlmt_megatron.models.hf_config import HFModelSpec, load_hf_config, parse_hf_config

# Hub config.json fields (meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B): the shapes the recipes use.
KNOWN_SHAPES: dict[str, dict] = {
    "llama3.1-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
}
# Letters and digits of a path that identify a known shape (Skywork's RM is a Llama-3.1-8B).
NAME_PATTERNS: dict[str, tuple[str, ...]] = {
    "llama3.1-8b": ("llama318b",),
    "qwen2.5-7b": ("qwen257b",),
}
POLICY_ROLES = ("policy", "reference", "critic")  # default to the policy's shape
ROLES = POLICY_ROLES + ("reward",)

# ------------------------------------------------------------------------------------ shapes


def assumed_shapes(items: list[str]) -> dict[str, str]:
    """``--assume-shape`` values ("NAME" or "ROLE=NAME") -> {role or "": NAME}."""
    out: dict[str, str] = {}
    for item in items:
        role, sep, name = item.rpartition("=")
        role = role if sep else ""
        if role and role not in ROLES:
            raise RLMTError(f"--assume-shape {item}: role must be one of {', '.join(ROLES)}")
        if name not in KNOWN_SHAPES:
            raise RLMTError(f"--assume-shape {item}: unknown shape {name!r}; known: {', '.join(KNOWN_SHAPES)}")
        out[role] = name
    return out


def _match_name(path: str) -> list[str]:
    key = re.sub(r"[^a-z0-9]", "", path.lower())
    return [name for name, pats in NAME_PATTERNS.items() if any(p in key for p in pats)]


@dataclass
class ResolvedModel:
    spec: HFModelSpec
    how: str  # where the shape came from
    padded_vocab: Optional[int] = None  # fixed by an rlmt checkpoint


def resolve_model(path: str, role: str, field_name: str, assumed: dict[str, str]) -> ResolvedModel:
    """The shape of the model at ``path``: its folder, else ``--assume-shape``, else its name."""
    p = Path(path)
    if p.exists():
        meta = p / "rlmt_model.json"
        if meta.is_file():
            from rlmt_megatron.checkpoint.dist_ckpt import read_checkpoint_meta

            m = read_checkpoint_meta(p)
            loads_as = {"reference": "policy"}.get(role, role)  # as trainer/roles.py loads it
            if m["role"] != loads_as:
                raise RLMTError(f"{field_name}={path}: checkpoint holds a {m['role']} model, but the run loads it "
                                f"as a {loads_as}")
            return ResolvedModel(parse_hf_config(m["hf_config"], str(meta)), f"{meta}", int(m["padded_vocab_size"]))
        return ResolvedModel(load_hf_config(p), str(p / "config.json"))
    name = assumed.get(role) or (assumed.get("") if role in POLICY_ROLES else None)
    if name:
        return ResolvedModel(parse_hf_config(KNOWN_SHAPES[name], f"built-in shape {name}"),
                             f"assumed {name} (--assume-shape; {path} does not exist)")
    matches = _match_name(path)
    if len(matches) == 1:
        return ResolvedModel(parse_hf_config(KNOWN_SHAPES[matches[0]], f"built-in shape {matches[0]}"),
                             f"assumed {matches[0]} (from the name; {path} does not exist)")
    flag = "--assume-shape NAME" if role in POLICY_ROLES else f"--assume-shape {role}=NAME"
    why = "matches several known shapes" if matches else "matches no known shape"
    raise RLMTError(f"{field_name}={path}: no such folder to read config.json from, and the name {why}; "
                    f"pass {flag} with NAME one of {', '.join(KNOWN_SHAPES)}")


def resolve_models(cfg, assumed: dict[str, str]) -> dict[str, ResolvedModel]:
    """Every model the run builds (``RLMTConfig.roles()``), by role. The reference and the critic
    start from the policy unless they name their own (``ModelsConfig.source``)."""
    models: dict[str, ResolvedModel] = {}
    for role in cfg.roles():
        field, path = cfg.models.source(role)
        if role != "policy" and field == "models.policy":  # starts from the policy: the same shape
            models[role] = models["policy"]
        else:
            models[role] = resolve_model(path, role, field, assumed)
    return models


# ------------------------------------------------------------------------------------ counts


def padded_vocab(model: ResolvedModel, build: ModelBuildConfig) -> int:
    """The vocabulary rows the builder gives ``model`` under ``build`` (``models/builder.py``'s
    ``padded_vocab_size``), or what its checkpoint fixed."""
    if model.padded_vocab is not None:
        return model.padded_vocab
    return padded_vocab_size(model.spec.vocab_size, build)


def layer_params(spec: HFModelSpec, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank (the two norms are replicated)."""
    h, f = spec.hidden_size, spec.intermediate_size
    q, g = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    sharded = h * (q + 2 * g) + q * h + 3 * h * f + ((q + 2 * g) if spec.qkv_bias else 0)
    return sharded // tp + 2 * h


def stage_params(spec: HFModelSpec, role: str, parallel: ParallelConfig, vocab: int, stage: int) -> int:
    """Parameters a rank of PP stage ``stage`` holds of ``role`` (all its virtual chunks)."""
    tp, pp = parallel.tp, parallel.pp
    n = spec.num_hidden_layers // pp * layer_params(spec, tp)
    if stage == 0:
        n += vocab * spec.hidden_size // tp  # embedding
    if stage == pp - 1:
        n += spec.hidden_size  # final norm
        if role == "policy":
            if not (spec.tie_word_embeddings and pp == 1):  # tied under PP: the last stage keeps a copy
                n += vocab * spec.hidden_size // tp
        else:
            n += spec.hidden_size + (1 if role == "critic" else 0)  # scalar head (critic with bias)
    return n


def hf_model_params(spec: HFModelSpec) -> int:
    """Parameters of the whole HF causal LM (what an engine loads)."""
    head = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size
    return (spec.num_hidden_layers * layer_params(spec, 1) + spec.vocab_size * spec.hidden_size + head
            + spec.hidden_size)


def layer_activation_bytes_per_token(spec: HFModelSpec, parallel: ParallelConfig, te: bool) -> float:
    """Bytes one decoder layer keeps for backward per token (``docs/dry_run.md``: the formulas)."""
    h, f, d, n = spec.hidden_size, spec.intermediate_size, spec.head_dim, spec.num_attention_heads
    q, g = n * d, spec.num_key_value_heads * d
    t = parallel.tp
    s = t if parallel.sequence_parallel else 1
    norms = (8 * h + 8) if te else (16 * h + 8)
    return 8 * d + norms / s + (6 * q + 6 * g + 10 * f + 4 * n) / t


def recompute_input_bytes_per_token(spec: HFModelSpec, parallel: ParallelConfig) -> float:
    """Full recomputation keeps each recomputed chunk's input hidden states (bf16, sequence-
    sharded under sequence parallelism) and nothing else of the chunk until backward."""
    s = parallel.tp if parallel.sequence_parallel else 1
    return 2 * spec.hidden_size / s


def final_norm_bytes_per_token(spec: HFModelSpec, parallel: ParallelConfig, te: bool) -> float:
    s = parallel.tp if parallel.sequence_parallel else 1
    return ((4 if te else 8) * spec.hidden_size + 4) / s


def kv_bytes_per_token(spec: HFModelSpec, engine_tp: int, elem: int = 2) -> float:
    """KV cache bytes per token on one engine GPU (KV heads replicated when TP > KV heads)."""
    heads = max(1.0, spec.num_key_value_heads / engine_tp)
    return spec.num_hidden_layers * 2 * heads * spec.head_dim * elem


def engine_weight_bytes(spec: HFModelSpec, engine_tp: int, fp8: bool) -> float:
    total = hf_model_params(spec)
    if not fp8:
        return total * 2 / engine_tp
    linears = spec.num_hidden_layers * (layer_params(spec, 1) - 2 * spec.hidden_size)
    return (linears * 1 + (total - linears) * 2) / engine_tp
