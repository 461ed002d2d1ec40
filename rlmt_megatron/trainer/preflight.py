"""rlmt-train's inputs, checked before anything is built.

A missing prompt file or tokenizer would otherwise surface only after every model and optimizer
is built, under pages of Megatron output. These checks read files only (config.json, the
tokenizer, the first byte of each prompt file): no Megatron, no process group. Every rank runs
them on the same files, so all ranks fail alike. Full validation (rows, weights) stays where
the data is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlmt_megatron.config.rlmt import RLMTConfig
from rlmt_megatron.errors import InputFileError, RLMTError
from rlmt_megatron.models.hf_config import load_hf_config, parse_hf_config

# checkpoint/dist_ckpt.py's META_NAME; not imported, since that module imports torch.distributed and Megatron
META_NAME = "rlmt_model.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(source: str, what: str):
    """``AutoTokenizer.from_pretrained(source)``; a failure is an InputFileError saying what is missing.

    transformers' own message for a folder without tokenizer files suggests installing
    sentencepiece or tiktoken, which is never the fix here.
    """
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputFileError(f"cannot load the {what} tokenizer: no tokenizer files "
                             f"({' / '.join(TOKENIZER_FILES)}) in {source}")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # tokenizers raises plain Exception on a corrupt tokenizer.json
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "sentencepiece" in str(e) or "tiktoken" in str(e) or "slow tokenizer" in str(e):
            text = "no tokenizer.json (tokenizer_config.json alone does not define the vocabulary)"
        raise InputFileError(f"cannot load the {what} tokenizer from {source}: {text}") from None


def check_model(field: str, source: str) -> None:
    """``source`` is an HF folder with a supported config.json, or an rlmt Megatron checkpoint."""
    path = Path(source)
    if not path.exists():
        raise InputFileError(f"{field}: {source} does not exist")
    if not path.is_dir():
        raise InputFileError(f"{field}: {source} is not a folder (expected an HF model folder or an rlmt checkpoint)")
    try:
        meta = path / META_NAME
        if meta.is_file():
            try:
                hf_config = json.loads(meta.read_text())["hf_config"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputFileError(f"{meta}: not a valid rlmt checkpoint description ({type(e).__name__}: {e})")
            parse_hf_config(hf_config, str(meta))
        elif (path / "config.json").is_file():
            load_hf_config(path)
        else:
            raise InputFileError(f"{source} has neither config.json (HF model folder) nor {META_NAME} (rlmt checkpoint)")
    except RLMTError as e:
        raise type(e)(f"{field}: {e}") from None


def check_prompt_file(field: str, source: str) -> None:
    path = Path(source)
    if not path.exists():
        raise InputFileError(f"{field}: {source} does not exist")
    try:
        if path.is_dir():  # a datasets folder
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        raise InputFileError(f"{field}: {source} cannot be read ({e.strerror})") from None


def check_inputs(cfg: RLMTConfig) -> None:
    """Every model the run builds, the policy's and reward model's tokenizers, every prompt file."""
    seen = set()
    for role in cfg.roles():
        field, source = cfg.models.source(role)
        if (field, source) not in seen:  # reference and critic default to the policy: check it once
            seen.add((field, source))
            check_model(field, source)
    for field, source, what in (("models.policy", cfg.models.policy, "policy"),
                                ("models.reward", cfg.models.reward, "reward model")):
        try:
            load_tokenizer(source, what)
        except InputFileError as e:
            raise InputFileError(f"{field}: {e}") from None
    for i, source in enumerate(cfg.data.prompts):
        check_prompt_file(f"data.prompts[{i}]", source)
