"""Forward-only per-token logprobs without ever materialising the [tokens, V/tp] logits.

The plain forward-only pass (``forward_only.sequence_logprobs``) lets GPTModel apply its output
layer to every token at once: for 4 x 4096 tokens and a 128K vocabulary that is 4 GiB of bf16
logits, plus a second copy from GPTModel's ``[s, b, V] -> [b, s, V]`` transpose and another
when the last position is sliced off (several rows). With a 128K vocabulary those copies, not
the decoder's activations, dominate the pass's memory (benchmarks/logprob_pass.py measures it).

Here the last pipeline stage's output layer is bypassed for the duration of the pass (its
``forward`` returns the final-norm hidden states, gathered along the sequence under sequence
parallelism, exactly as the output layer would have seen them), so GPTModel returns [b, s, h].
The output layer's own weight (vocab-parallel: rows ``rank * V/tp ...`` of the vocabulary, or
the tied embedding, whichever GPTModel would use) is then applied ``chunk_tokens`` tokens at a
time, with the same ``matmul(x, W^T)`` as Megatron's ColumnParallelLinear, and each chunk goes
through :func:`vocab_parallel_logprobs` (TP all-reduces of per-token scalars only). Only real
tokens are computed (right padding of a micro-batch is skipped). No gradients: this serves the
old-policy and reference logprobs, which are computed under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from rlmt_megatron.errors import RLMTError
from rlmt_megatron.runner.batching import samples_from_sequences
from rlmt_megatron.runner.model_runner import as_runner

DEFAULT_CHUNK_TOKENS = 1024


def _gpt_models(chunks: Sequence[Any]) -> list:
    """The GPTModels behind possibly wrapped chunks (Megatron DDP / Float16Module keep ``.module``)."""
    out = []
    for chunk in chunks:
        while not hasattr(chunk, "output_layer") and hasattr(chunk, "module"):
            chunk = chunk.module
        out.append(chunk)
    return out


def _vocab_parallel_head(model):
    """The output layer of a last-stage policy chunk, refusing scalar heads (critic, reward)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    layer = getattr(model, "output_layer", None)
    if not isinstance(layer, ColumnParallelLinear):
        raise RLMTError(
            f"chunked-head logprobs need a policy model whose output layer is a vocab-parallel "
            f"ColumnParallelLinear; this chunk's output layer is {type(layer).__name__} (critic/reward heads "
            f"produce scores, not logprobs)"
        )
    return layer


def head_weight(model) -> torch.Tensor:
    """The [V/tp, h] weight GPTModel's output layer multiplies with: the tied embedding when the
    model shares it, else the output layer's own (as ``GPTModel._postprocess`` chooses)."""
    model = _gpt_models([model])[0]
    layer = _vocab_parallel_head(model)
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return layer.weight


@contextlib.contextmanager
def final_hidden_states(chunks: Sequence[Any]) -> Iterator[None]:
    """While active, the last-stage chunk(s) return the final hidden states [b, s, h] instead of
    logits. Only the output layer's ``forward`` is shadowed on the instance (the module tree and
    its parameters stay as they are, so DDP wrappers and checkpoints are unaffected) and restored
    on exit, also after an error."""
    patched = []
    try:
        for model in _gpt_models(chunks):
            if not getattr(model, "post_process", False):
                continue  # earlier pipeline stages have no output layer
            layer = _vocab_parallel_head(model)
            if "forward" in vars(layer):  # nested use would restore the logits too early
                raise RuntimeError("final_hidden_states is already active for this model")

            def passthrough(hidden, weight=None, runtime_gather_output=None, _layer=layer):
                # ColumnParallelLinear gathers a sequence-parallel input inside its matmul; the
                # chunked head multiplies full-sequence hidden states itself, so gather here.
                if _layer.sequence_parallel:
                    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                    hidden = gather_from_sequence_parallel_region(
                        hidden, tensor_parallel_output_grad=False, group=_layer.tp_group
                    )
                return hidden, None

            layer.forward = passthrough
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward  # the class's forward shows through again


@torch.no_grad()
def chunked_head_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    true_vocab_size: int,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """log p(targets) from final hidden states ``[..., h]`` and this rank's vocab-parallel head
    ``weight`` [V/tp, h]; float32 with the shape of ``targets``. Collective over the TP group
    (every TP rank must call it with the same tokens)."""
    from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not line up")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the head weight {tuple(weight.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=hidden.device)
    for a in range(0, flat.shape[0], chunk_tokens):
        b = min(a + chunk_tokens, flat.shape[0])
        logits = torch.matmul(flat[a:b], weight.t())  # ColumnParallelLinear's forward product
        out[a:b] = vocab_parallel_logprobs(logits, flat_targets[a:b], true_vocab_size, temperature)
        del logits
    return out.view(targets.shape)


def sequence_logprobs_chunked(
    model: Any,
    sequences: Sequence[Sequence[int]],
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[torch.Tensor]:
    """Same contract as ``forward_only.sequence_logprobs`` (per sequence, log p(token_t |
    tokens_<t) for t = 1..len-1, float32 CPU, on every rank), computed with the chunked head.
    ``model``: a BuiltModel or a ModelRunner of the policy (whose batching sets the micro-batch
    token budget)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    engine = as_runner(model)
    vocab = engine.built.spec.vocab_size
    last = _gpt_models(engine.built.chunks)[-1]
    weight = head_weight(last) if getattr(last, "post_process", False) else None

    def reduce(hidden, mb):
        n_rows = len(mb.indices)
        counts = mb.lengths[:n_rows] - 1
        # Real tokens only, row by row: right padding (and interleaving filler rows) is skipped.
        real = torch.arange(hidden.shape[1] - 1, device=hidden.device)[None, :] < counts[:, None].to(hidden.device)
        lp = chunked_head_logprobs(hidden[:n_rows, :-1][real], mb.targets[:n_rows][real], weight, vocab,
                                   temperature, chunk_tokens)
        return list(lp.cpu().split(counts.tolist()))

    with final_hidden_states(engine.built.chunks):
        return engine.forward(samples_from_sequences(sequences), reduce)
