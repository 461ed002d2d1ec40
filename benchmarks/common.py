"""What every benchmark shares: the Llama-3.1-8B shape, a random HF model writer, model FLOPs,
the measured matmul peak, peak-memory probes, and the header of a results section.

Each benchmark prints a table and, with ``--write docs/benchmarks.md``, appends a section that
says when, on what, with which software and with which command it was measured.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from rlmt_megatron.planner import flops

REPO = Path(__file__).resolve().parent.parent
# Taken when a benchmark imports this module (its first lines): the load its measurements ran
# under, not the load when the results are written at the end.
LOAD_AT_START = os.getloadavg()

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json) minus the layer count and vocabulary.
LLAMA31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
    mlp_bias=False, hidden_act="silu",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
LLAMA31_8B_LAYERS, LLAMA31_8B_VOCAB = 32, 128256


# --------------------------------------------------------------------------- models

def llama_config(layers: int, vocab: int, **shape):
    """transformers LlamaConfig: the 8B shape, or ``shape`` keys overriding it (small models)."""
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, dtype="bfloat16", **{**LLAMA31_8B, **shape})


def parameter_shapes(layers: int, vocab: int, **shape) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of LlamaForCausalLM for this config (built on the meta device)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(layers, vocab, **shape))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_random_model(folder: Path, layers: int, vocab: int, device: str = "cpu", seed: int = 0, **shape) -> int:
    """HF folder with random bf16 weights (norms at one, others N(0, 0.02)) and a small tokenizer;
    returns the weight bytes. The tokenizer only has to exist: benchmark token ids are random."""
    from rlmt_megatron.checkpoint.safetensors_io import write_safetensors_folder
    from rlmt_megatron.testing.tiny_models import train_tokenizer

    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shp in parameter_shapes(layers, vocab, **shape).items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shp, dtype=torch.bfloat16)
        else:  # generated where it is fast, stored on the host for writing
            state[name] = torch.empty(shp, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=gen).cpu()
    write_safetensors_folder(state, folder)
    llama_config(layers, vocab, **shape).save_pretrained(folder)
    train_tokenizer(1024).save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in state.values())


class DecoderShape(flops.DecoderShape):
    """The FLOP count of ``rlmt_megatron/planner/flops.py`` (one implementation, shared with the
    dry run's step-time projection), plus the benchmarks' Llama-3.1-8B shape."""

    @classmethod
    def llama31_8b(cls, layers: int = LLAMA31_8B_LAYERS, vocab: int = LLAMA31_8B_VOCAB) -> "DecoderShape":
        s = LLAMA31_8B
        return cls(layers, s["hidden_size"], s["intermediate_size"], s["num_attention_heads"],
                   s["num_key_value_heads"], s["head_dim"], vocab)


# --------------------------------------------------------------------------- measuring

def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], repeats: int, warmup: int, device: str | torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def matmul_peak_tflops(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                       repeats: int = 10) -> float:
    """Measured dense matmul rate of this device (TFLOP/s): the median of ``repeats`` n x n x n
    products on random data after three warm-ups (n = 8192 on GPU, 1024 on CPU). MFU is reported
    against this, not the datasheet, so it says how much of what the chip really does is used."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_calls(lambda: a @ b, repeats, 3, device)
    return 2 * n**3 / statistics.median(seconds) / 1e12


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_memory(device: str | torch.device) -> int:
    """Start a peak-memory window; returns the bytes in use now. On GPU the caching allocator's
    counters; on CPU the kernel's peak-RSS mark reset to the current RSS (Linux clear_refs 5)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak_memory(device: str | torch.device) -> int:
    """Peak bytes since the last ``reset_peak_memory`` (allocated tensors on GPU, RSS on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


# --------------------------------------------------------------------------- arguments

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def name_list(allowed) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated, non-empty subset of ``allowed`` (order kept)."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown or [text]}; choose from {', '.join(allowed)}")
        return names
    return parse


def device_defaults(a: argparse.Namespace, defaults: dict[str, dict], cuda: bool | None) -> argparse.Namespace:
    """Set ``a.device`` (cuda when available, or as ``cuda`` forces it: tests) and fill every
    argument left at None from ``defaults[a.device]``."""
    a.device = "cuda" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu"
    for key, value in defaults[a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


# --------------------------------------------------------------------------- reporting

def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    return f"CPU {model}, {os.cpu_count()} cores{mem}"


def versions(packages=("torch", "megatron-core", "transformers", "transformer-engine")) -> str:
    found = []
    for pkg in packages:
        try:
            found.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            if pkg != "transformer-engine":
                found.append(f"{pkg} absent")
    if "transformer-engine" in packages and not any(f.startswith("transformer-engine") for f in found):
        found.append("no transformer-engine")
    return ", ".join(found)


def measured_command(script: str, argv: list[str]) -> str:
    """The command line without --write (where the results go does not change them)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--write":
            skip = True
        elif not arg.startswith("--write="):
            kept.append(arg)
    return " ".join([f"python {script}", *kept])


def section_header(title: str, script: str, argv: list[str]) -> str:
    """Markdown heading + where/what/how line for one appended results section."""
    load = LOAD_AT_START
    return (f"\n## {title} ({datetime.date.today()})\n\n"
            f"{machine()}; {versions()}. Load average when the script started (1/5/15 min): "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.\n"
            f"Command: `{measured_command(script, argv)}`\n\n")


def append_section(path: Path | None, text: str) -> None:
    if path is not None:
        with Path(path).open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
