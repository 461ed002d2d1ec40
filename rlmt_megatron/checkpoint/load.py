"""Build a role's model and fill it from an HF folder or an rlmt Megatron checkpoint."""

from __future__ import annotations

from pathlib import Path

from rlmt_megatron.checkpoint.dist_ckpt import META_NAME, load_model_checkpoint, read_checkpoint_meta
from rlmt_megatron.checkpoint.hf_loader import load_hf_weights
from rlmt_megatron.config.model_build import ModelBuildConfig
from rlmt_megatron.errors import CheckpointError
from rlmt_megatron.models.builder import BuiltModel, Role, build_model
from rlmt_megatron.models.hf_config import load_hf_config, parse_hf_config


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_NAME).is_file()


def load_model(source: str | Path, role: Role, build: ModelBuildConfig) -> BuiltModel:
    """Model for ``role`` on this rank, weights from ``source`` (HF folder or Megatron checkpoint).

    Parallel state must already be initialised for ``build.parallel``.
    """
    if is_megatron_checkpoint(source):
        meta = read_checkpoint_meta(source)
        if meta["role"] != role:
            raise CheckpointError(f"{source}: checkpoint holds a {meta['role']} model, not a {role}")
        spec = parse_hf_config(meta["hf_config"], str(Path(source) / META_NAME))
        built = build_model(spec, role, build, padded_vocab=meta["padded_vocab_size"])
        load_model_checkpoint(built, source)
        return built
    spec = load_hf_config(source)
    built = build_model(spec, role, build)
    load_hf_weights(built, source)
    return built
