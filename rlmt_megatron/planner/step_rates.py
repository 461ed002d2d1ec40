"""The rates the dry run's step-time projection divides by: one table, each rate with its unit and
its source, so that a GPU measurement replaces a row (and says "measured") without touching the
arithmetic in ``step_time.py``. ``rlmt-train --dry-run --rate NAME=VALUE`` overrides a row for one
run (``docs/dry_run.md``, "Step time").

No rate here has been measured by this project yet: each is "assumed", with the public figure it
is derived from, or none where no figure was found."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rlmt_megatron.errors import RLMTError

# Llama-3.1-8B's weights in bf16, the model NeMo-RL's published step below refits.
_LLAMA_8B_GB = 8.03e9 * 2 / 1e9
# NeMo-RL's Llama-3.1-8B-Instruct GRPO step on one node of 8 H100 (vLLM TP 1 x 8, Megatron training):
# 112 s = 58 s generation + 18 s logprobs + 28 s training + 5 s refit, of 64 prompts x 32 samples
# (NVIDIA-NeMo/RL examples/configs/recipes/llm/performance/grpo-llama3.1-8b-instruct-1n8g.yaml,
# num_prompts_per_step 64, num_generations_per_prompt 32, max_new_tokens 4096).
NEMO_RL_8B = "NeMo-RL Llama-3.1-8B GRPO on 8xH100: 112 s = 58 gen + 18 logprobs + 28 train + 5 refit"


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    what: str
    source: str  # "assumed: <the public figure it comes from>" or "measured: <benchmark, date, GPU>"


RATES: dict[str, Rate] = {
    "gen_tokens_per_s_per_gpu": Rate(
        2048 * 1060 / 58 / 8, "tokens/s", "decode rate of one engine GPU at a full batch (an engine of g GPUs: g x this)",
        f"assumed: {NEMO_RL_8B}; 2048 sequences x 1,060 tokens (the average generated length NeMo-RL's "
        "v0.4 performance summary reports for this model and dataset) / 58 s / 8 GPUs"),
    "peak_tflops": Rate(989.0, "TFLOP/s", "dense bf16 matmul peak of one trainer GPU",
                        "assumed: NVIDIA H100 SXM datasheet, 989 TFLOP/s dense BF16"),
    "train_mfu": Rate(0.40, "of peak", "model FLOPs utilisation of the training passes (forward + backward)",
                      "assumed: below the 476 TFLOP/s = 0.48 of peak one H100 reached on 4 Llama-3.1-8B layers with "
                      "Megatron-Core's TE spec (docs/benchmarks.md, 'Expectations'), a whole step adding the "
                      f"optimizer and DP/TP communication; {NEMO_RL_8B} implies ~0.4-0.5"),
    "logprob_mfu": Rate(0.40, "of peak", "model FLOPs utilisation of the forward-only passes (logprobs, values, "
                        "reward)", "assumed: as train_mfu"),
    "sync_cuda_ipc_gb_per_s": Rate(
        _LLAMA_8B_GB / 5.0, "GB/s", "colocated weight update: export, handles, the engine's load",
        f"assumed: {NEMO_RL_8B}; {_LLAMA_8B_GB:.1f} GB of bf16 weights / 5 s"),
    "sync_in_process_gb_per_s": Rate(_LLAMA_8B_GB / 5.0, "GB/s", "vLLM / hf update through the engine's process",
                                     "assumed: as sync_cuda_ipc_gb_per_s"),
    "sync_nccl_gb_per_s": Rate(25.0, "GB/s", "NCCL broadcast from the trainer to disaggregated engines",
                               "assumed: half of one 400 Gb/s (50 GB/s) NDR InfiniBand link per GPU"),
    "sync_disk_gb_per_s": Rate(2.0, "GB/s", "a version written to a shared folder and read by the engines",
                               "assumed, no public figure: a shared filesystem's write then read; measure yours"),
    "response_fraction": Rate(
        1.0, "of max_new_tokens", "the response length every phase assumes",
        "assumed (ours): a generation lasts as long as its longest response, and the memory table already "
        "assumes every sequence at full length; an upper bound for the training passes"),
}


def resolve_rates(overrides: list[str]) -> dict[str, Rate]:
    """``RATES`` with ``--rate NAME=VALUE`` overrides applied (their source says so)."""
    rates = dict(RATES)
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in RATES:
            raise RLMTError(f"--rate {item}: expected NAME=VALUE with NAME one of {', '.join(RATES)}")
        try:
            value = float(text)
        except ValueError:
            raise RLMTError(f"--rate {item}: {text!r} is not a number") from None
        if not value > 0:
            raise RLMTError(f"--rate {item}: must be > 0")
        rates[name] = replace(RATES[name], value=value, source="given: --rate on the command line")
    return rates
