"""Builds the rollout engine a run's ``rollout`` section asks for (one place, for the loop's
supervisor and for restarts).

With ``engine_process: subprocess`` (always for vLLM) the engine runs in a child process behind
a pipe, so its death or a call longer than ``rollout.timeout_s`` becomes an ``EngineError`` the
loop survives by restarting it. Impossible ``engine_process`` choices are refused when the config
is loaded (``RolloutConfig``), not here.
"""

from __future__ import annotations

import os

from rlmt_megatron.config.rlmt import RolloutConfig
from rlmt_megatron.rollout.engine import RolloutEngine

# What the engines are, by import path (a child process imports them; tests substitute an hf
# engine with injected faults).
HF_ENGINE = "rlmt_megatron.rollout.hf_engine.HFEngine"
VLLM_ENGINE = "rlmt_megatron.rollout.vllm_engine.VLLMEngine"


def sglang_client(rollout: RolloutConfig, member: int = 0, stage: int = 0, stages: int = 1):
    """A client of SGLang server ``member``; its weight-update group is the one of pipeline stage
    ``stage`` of ``stages`` (``weight_sync/stage_groups.py``; one stage: the engine's only group)."""
    from rlmt_megatron.rollout.sglang_engine import DEFAULT_GROUP_NAME, SGLangHTTPEngine

    # Each member's weight-update group is a process group in the rank that drives it, and torch
    # refuses a second group of the same name: a fleet's members get one name each, and so do the
    # stages (SGLang keeps a group per name).
    group = DEFAULT_GROUP_NAME if rollout.engines == 1 else f"{DEFAULT_GROUP_NAME}_{member}"
    if stages > 1:
        group = f"{group}_pp{stage}"
    return SGLangHTTPEngine(rollout.server_urls()[member], timeout=rollout.timeout_s, group_name=group)


def make_rollout_engine(rollout: RolloutConfig, model_dir: str, *, dtype: str, max_model_len: int,
                        seed: int, member: int = 0, slot: int = 0) -> RolloutEngine:
    """A new engine serving ``model_dir``: member ``member`` of the run's ``rollout.engines``, the
    ``slot``-th engine of its node (``trainer/engine_hosts.py``).
    ``dtype``: the weights' dtype in the engine (the trainer's on GPU, float32 on CPU);
    ``max_model_len``: longest prompt + response (vLLM's KV cache); ``seed``: vLLM's sampler seed."""
    r = rollout
    if r.engine == "sglang":
        return sglang_client(r, member)
    from rlmt_megatron.rollout.subprocess_engine import SubprocessEngine

    env = _member_devices(r.engines, slot)
    if r.engine == "hf":
        if r.engine_process != "subprocess":
            from rlmt_megatron.rollout.hf_engine import HFEngine

            return HFEngine(model_dir, dtype=dtype)
        # a fleet: a prompt's samples must not depend on the engine that served it (hf_engine.generate)
        return SubprocessEngine(HF_ENGINE, {"model_dir": model_dir, "dtype": dtype, "seed_per_prompt": r.engines > 1},
                                timeout_s=r.timeout_s, env=env)
    return SubprocessEngine(VLLM_ENGINE,
                            {"model_dir": model_dir, "max_model_len": max_model_len, "seed": seed, "dtype": dtype,
                             "gpu_memory_utilization": r.gpu_memory_utilization},
                            timeout_s=r.timeout_s, env=env)


def _member_devices(engines: int, slot: int) -> dict[str, str]:
    """Engine processes of a fleet each take one of their node's GPUs, by their place among the
    node's engines (one engine alone keeps the trainer's view of the devices). Nothing to choose
    on a CPU."""
    import torch

    if engines == 1 or not torch.cuda.is_available():
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {"CUDA_VISIBLE_DEVICES": devices[slot % len(devices)]}
