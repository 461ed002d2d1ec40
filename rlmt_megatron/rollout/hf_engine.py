"""The embedded rollout engine: transformers generation in the trainer's process (CPU or one GPU).

It is built once from an HF folder (config + tokenizer; weights replaced at the first sync) and
then receives every sync from the same HF-named buckets the other engines receive, so the
default path exercises export, name mapping and sync for real. Generation is batched with a KV
cache (``model.generate``), prompts left-padded as decoder-only generation requires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from rlmt_megatron.rollout.engine import Bucket, EngineError, RolloutEngine
from rlmt_megatron.rollout.types import Generation, SamplingParams, stop_string_end
from rlmt_megatron.rollout.weight_sync.checksum import tensors_checksum


class HFEngine(RolloutEngine):
    name = "hf"

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: torch.dtype | str = torch.float32,
                 seed_per_prompt: bool = False):
        """``dtype``: the engine's weights (a torch dtype or its name). The trainer passes its own
        ``build.precision.params_dtype`` on GPU (bf16 there, as SGLang serves) and float32 on CPU.
        ``seed_per_prompt``: see :meth:`generate` (the factory sets it for a fleet of engines)."""
        self.seed_per_prompt = seed_per_prompt
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise EngineError(f"hf engine: unknown dtype '{dtype}'")
            dtype = getattr(torch, dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise EngineError(f"hf engine: cannot load {model_dir} ({e})") from None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.weight_version = 0
        self._received: set[str] = set()

    # ------------------------------------------------------------------ weights

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        params = dict(self.model.named_parameters())
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        expected = {n for n in params if not (tied and n == "lm_head.weight")}
        received: set[str] = set()
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket:
                    target = params.get(name)
                    if target is None:
                        raise EngineError(f"hf engine: weight sync v{version} sent '{name}', which the model does not have")
                    if tuple(target.shape) != tuple(tensor.shape):
                        raise EngineError(
                            f"hf engine: weight sync v{version}: '{name}' has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(target.shape)}"
                        )
                    target.copy_(tensor.to(target.device, target.dtype))
                    received.add(name)
        if received != expected:
            missing = sorted(expected - received)
            raise EngineError(f"hf engine: weight sync v{version} is incomplete; missing {missing[:5]}")
        self._received = received
        self.weight_version = version

    def checksum(self) -> str:
        """Checksum of the weights the last sync delivered (compare with the trainer's export)."""
        params = dict(self.model.named_parameters())
        return tensors_checksum((n, params[n]) for n in self._received)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[list[Generation]]:
        """All prompts in one batch, seeded once with ``params.seed`` (each row draws its own
        random numbers); or, with ``seed_per_prompt`` and ``seeds``, each prompt's ``n`` samples
        in a call of their own after seeding with the prompt's seed, so that they depend only on
        the prompt, the weights and that seed, as with vLLM's per-request seeds: the same
        whichever engine of a fleet serves the prompt, and whatever other prompts share the call.
        That costs the batching across prompts (about 2x the generation time of the CPU demo's 8
        prompts), so a single engine keeps one batch."""
        if seeds is None or not self.seed_per_prompt:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            return self._generate_batch(prompts, params)
        if len(seeds) != len(prompts):
            raise EngineError(f"hf engine: {len(seeds)} seeds for {len(prompts)} prompts")
        results = []
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise EngineError(f"hf engine: prompt {index} is empty")
            torch.manual_seed(seeds[index])
            (samples,) = self._generate_batch([prompt], params)
            for g in samples:
                g.prompt_index = index
            results.append(samples)
        return results

    def _generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Generation]]:
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            if not p:
                raise EngineError(f"hf engine: prompt {row} is empty")
            ids[row, width - len(p):] = torch.as_tensor(list(p))
            mask[row, width - len(p):] = 1
        greedy = params.temperature == 0
        stop_ids = list(params.stop_token_ids)
        try:
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                do_sample=not greedy, temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p, top_k=None if greedy or params.top_k <= 0 else params.top_k,
                max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
                eos_token_id=stop_ids or None, pad_token_id=self.pad_id,
                stop_strings=params.stop or None, tokenizer=self.tokenizer if params.stop else None,
                output_logits=True, return_dict_in_generate=True,
            )
        except RuntimeError as e:
            raise EngineError(f"hf engine: generation failed ({e})") from None
        new_on_device = out.sequences[:, width:]
        new = new_on_device.cpu()
        # Raw logits (before temperature/top-p/top-k processors): the trainer's distribution.
        # One generated position at a time on the device: stacking them all in float32 would
        # hold [samples, steps, vocab] twice and copy it to the host.
        temperature = params.temperature or 1.0
        logprobs = torch.stack([
            torch.log_softmax(step_logits.float() / temperature, dim=-1).gather(-1, new_on_device[:, t, None])[:, 0]
            for t, step_logits in enumerate(out.logits)
        ], dim=1).cpu()
        results: list[list[Generation]] = [[] for _ in prompts]
        for row in range(new.shape[0]):
            tokens, finish = self._cut(new[row].tolist(), stop_ids, params)
            prompt_index, sample_index = divmod(row, params.n)
            results[prompt_index].append(Generation(
                prompt_index=prompt_index, sample_index=sample_index, token_ids=tokens,
                logprobs=logprobs[row, : len(tokens)].tolist(), finish_reason=finish,
                weight_version=self.weight_version,
            ))
        return results

    def _cut(self, tokens: list[int], stop_ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
        """Cut at the first stop token (kept) or after the first stop string's last token."""
        ends = [i + 1 for i, t in enumerate(tokens) if t in stop_ids][:1]
        at_string = stop_string_end(self.tokenizer.decode, tokens, params.stop)
        ends += [] if at_string is None else [at_string]
        return (tokens[: min(ends)], "stop") if ends else (tokens, "length")

    def close(self) -> None:
        self.model = None
