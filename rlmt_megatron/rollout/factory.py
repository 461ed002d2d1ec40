"""Builds the rollout engine a run's ``rollout`` section asks for (one place, for the loop's
supervisor and for restarts).

With ``engine_process: subprocess`` (always for vLLM) the engine runs in a child process behind
a pipe, so its death or a call longer than ``rollout.timeout_s`` becomes an ``EngineError`` the
loop survives by restarting it. Impossible ``engine_process`` choices are refused when the config
is loaded (``RolloutConfig``), not here.
"""

from __future__ import annotations

from rlmt_megatron.config.rlmt import RolloutConfig
from rlmt_megatron.rollout.engine import RolloutEngine

# What the engines are, by import path (a child process imports them; tests substitute an hf
# engine with injected faults).
HF_ENGINE = "rlmt_megatron.rollout.hf_engine.HFEngine"
VLLM_ENGINE = "rlmt_megatron.rollout.vllm_engine.VLLMEngine"


def make_rollout_engine(rollout: RolloutConfig, model_dir: str, *, dtype: str, max_model_len: int,
                        seed: int) -> RolloutEngine:
    """A new engine serving ``model_dir``. ``dtype``: the weights' dtype in the engine (the
    trainer's on GPU, float32 on CPU); ``max_model_len``: longest prompt + response (vLLM's KV
    cache); ``seed``: vLLM's sampler seed."""
    r = rollout
    if r.engine == "sglang":
        from rlmt_megatron.rollout.sglang_engine import SGLangHTTPEngine

        return SGLangHTTPEngine(r.sglang_url, timeout=r.timeout_s)
    from rlmt_megatron.rollout.subprocess_engine import SubprocessEngine

    if r.engine == "hf":
        if r.engine_process != "subprocess":
            from rlmt_megatron.rollout.hf_engine import HFEngine

            return HFEngine(model_dir, dtype=dtype)
        return SubprocessEngine(HF_ENGINE, {"model_dir": model_dir, "dtype": dtype}, timeout_s=r.timeout_s)
    return SubprocessEngine(VLLM_ENGINE,
                            {"model_dir": model_dir, "max_model_len": max_model_len, "seed": seed, "dtype": dtype,
                             "gpu_memory_utilization": r.gpu_memory_utilization},
                            timeout_s=r.timeout_s)
