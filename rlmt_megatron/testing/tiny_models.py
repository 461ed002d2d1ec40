"""Build tiny, randomly initialised Hugging Face checkpoints for tests and smoke runs.

Nothing here touches a model hub: the tokenizer is trained on a small corpus embedded
in this module and the models are built from configs, so CI and air-gapped machines can
exercise the HF <-> Megatron conversion and the RL loop end to end.

Output layout (``build_tiny_models(out_dir)``)::

    out_dir/tokenizer/      byte-level BPE tokenizer with a Llama-3-style chat template
    out_dir/llama-policy/   LlamaForCausalLM (GQA, llama3 RoPE scaling, untied head)
    out_dir/qwen2-policy/   Qwen2ForCausalLM (q/k/v biases, tied embeddings)
    out_dir/llama-rm/       LlamaForSequenceClassification, one label (reward model)
    out_dir/MANIFEST.json   seed, folders and the sha256 of every file written

Every model folder also holds the tokenizer files, so each is loadable on its own.

The tokenizer does NOT prepend BOS when encoding (there is no post-processor template):
the chat template already starts with ``<|begin_of_text|>``, and adding it again on encode
would give two BOS tokens. Callers encoding raw text that needs BOS must add it themselves.

Outputs are deterministic for a given seed: rerunning writes byte-identical safetensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils.logging import disable_progress_bar

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD)

# Llama-3 layout: BOS, then per message a role header, the trimmed content and <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

HIDDEN_SIZE = 128
NUM_LAYERS = 4
NUM_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
INIT_STD = 0.02
NORM_JITTER_STD = 0.1
RM_HEAD_STD = 0.5
# The corpus is fixed (independent of --seed) so every seed shares one tokenizer.
CORPUS_SEED = 1234

# --------------------------------------------------------------------------- corpus

_NAMES = (
    "Alice", "Bob", "Carmen", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Imani", "Jonas",
    "Kavya", "Liam", "Mei", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tove",
)
_NOUNS = (
    "apple", "river", "mountain", "library", "engine", "garden", "window", "question",
    "answer", "teacher", "student", "computer", "network", "kitchen", "bicycle", "ocean",
    "forest", "village", "market", "planet", "battery", "letter", "number", "problem",
    "solution", "history", "science", "language", "picture", "weather", "festival",
    "hospital", "museum", "recipe", "journey", "algorithm", "theorem", "triangle",
    "dataset", "experiment", "orchestra", "umbrella", "lantern", "harbor", "compass",
    "notebook", "sandwich", "telescope", "volcano", "whistle",
)
_VERBS = (
    "found", "built", "painted", "explained", "carried", "measured", "opened", "repaired",
    "described", "counted", "visited", "borrowed", "designed", "tested", "cooked",
    "followed", "discovered", "wrote", "sorted", "compared", "remembered", "shared",
    "questioned", "translated", "celebrated", "optimized", "summarized", "predicted",
)
_ADJECTIVES = (
    "quiet", "bright", "heavy", "curious", "ancient", "modern", "gentle", "rapid", "narrow",
    "golden", "careful", "strange", "friendly", "complex", "simple", "broken", "hidden",
    "famous", "wooden", "colorful", "efficient", "generous", "patient", "remarkable",
)
_PLACES = (
    "Paris", "Nairobi", "Tokyo", "Lima", "Oslo", "Cairo", "Mumbai", "Toronto", "Sydney",
    "Berlin", "Seoul", "Madrid", "Istanbul", "Santiago", "Reykjavik", "Hanoi",
)
_ADVERBS = (
    "slowly", "quickly", "carefully", "happily", "suddenly", "quietly", "eventually",
    "honestly", "clearly", "gradually", "nearly", "probably",
)
_TOPICS = (
    "photosynthesis", "gravity", "prime numbers", "the water cycle", "compound interest",
    "recursion", "climate change", "the French revolution", "neural networks",
    "supply and demand", "plate tectonics", "the immune system", "sorting algorithms",
    "probability", "electricity", "poetry",
)
_OCCUPATIONS = (
    "astronomer", "baker", "carpenter", "chemist", "dentist", "electrician", "farmer",
    "journalist", "librarian", "mechanic", "musician", "nurse", "pilot", "plumber",
    "programmer", "sculptor", "surgeon", "translator", "veterinarian", "zoologist",
)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _narrative_sentence(rng: random.Random) -> str:
    """One plain English sentence; several shapes so BPE sees varied contexts."""
    name, other = rng.sample(_NAMES, 2)
    noun, noun2 = rng.sample(_NOUNS, 2)
    shape = rng.randrange(7)
    if shape == 0:
        return f"{name} {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} {noun} near the {noun2}."
    if shape == 1:
        return f"In {rng.choice(_PLACES)}, {name} {rng.choice(_ADVERBS)} {rng.choice(_VERBS)} a {noun}!"
    if shape == 2:
        return f"Why did {name} leave the {noun} with {other}? Nobody knows; it was {rng.choice(_ADJECTIVES)}."
    if shape == 3:
        return f'"The {noun} is {rng.choice(_ADJECTIVES)}," said {name}, "but the {noun2} is not."'
    if shape == 4:
        year, count = rng.randint(1800, 2030), rng.randint(2, 999)
        return f"By {year}, {name} had {rng.choice(_VERBS)} {count} {noun}s (and {rng.randint(1, 9)} {noun2}s)."
    if shape == 5:
        return f"{name} and {other} {rng.choice(_VERBS)} the {noun}: it cost ${rng.randint(1, 500)}.{rng.randint(10, 99)}."
    return (
        f"On {rng.choice(_WEEKDAYS)}, the {rng.choice(_OCCUPATIONS)} from {rng.choice(_PLACES)} "
        f"{rng.choice(_VERBS)} {rng.randint(3, 60)}% of the {noun}s; {other}'s {noun2} wasn't ready."
    )


def _arithmetic_line(rng: random.Random) -> str:
    """Digits and operators, so numbers and math prompts tokenize sensibly."""
    a, b = rng.randint(0, 9999), rng.randint(1, 999)
    op = rng.choice("+-*")
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {result}"


def _chat_exchange(rng: random.Random) -> str:
    """Chat-like text using the reasoning tags, so they become compact tokens.

    Deliberately free of the special tokens: those are added after training, and
    letting BPE see them as text would spend merges on strings that never occur.
    """
    topic = rng.choice(_TOPICS)
    name = rng.choice(_NAMES)
    math = _arithmetic_line(rng)
    question, answer = math.split(" = ")
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"user: Can you explain {topic} simply?\n"
            f"assistant: <think>{name} wants a short, {rng.choice(_ADJECTIVES)} explanation of {topic}. "
            f"Start with an example.</think>\n<response>Sure! Think of {topic} like a "
            f"{rng.choice(_NOUNS)}: it {rng.choice(_ADVERBS)} changes over time.</response>"
        )
    if kind == 1:
        return (
            f"user: What is {question}?\n"
            f"assistant: <think>Compute {question} step by step; the result is {answer}.</think>\n"
            f"<response>{question} = {answer}.</response>"
        )
    return (
        f"system: You are a helpful assistant.\nuser: Write one sentence about a {rng.choice(_NOUNS)}.\n"
        f"assistant: <think>Keep it short.</think><response>{_narrative_sentence(rng)}</response>"
    )


def training_corpus(num_lines: int = 1000) -> list[str]:
    """About a thousand varied lines: prose, arithmetic and chat with reasoning tags.

    Sized so BPE can reach a 2048-token vocab; ``train_tokenizer`` fails if it cannot.
    """
    rng = random.Random(CORPUS_SEED)
    makers: tuple[Callable[[random.Random], str], ...] = (_narrative_sentence, _arithmetic_line, _chat_exchange)
    weights = (5, 2, 3)
    return [rng.choices(makers, weights)[0](rng) for _ in range(num_lines)]


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE and wrap it with Llama-3-style specials and chat template.

    Specials are appended after the BPE vocab (ids ``vocab_size - 6 .. vocab_size - 1``),
    as in Llama 3. Raises if the corpus cannot support exactly ``vocab_size`` tokens,
    because a silently smaller vocab would mismatch every model's embedding table.
    """
    bpe_size = vocab_size - len(SPECIAL_TOKENS)
    if bpe_size <= len(pre_tokenizers.ByteLevel.alphabet()):
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level BPE plus {len(SPECIAL_TOKENS)} specials")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_corpus(), trainer=trainer)
    if backend.get_vocab_size() != bpe_size:
        raise RuntimeError(
            f"BPE reached only {backend.get_vocab_size()} of {bpe_size} tokens; enrich training_corpus()"
        )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TEXT, START_HEADER, END_HEADER],
        add_bos_token=False,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    return tokenizer


# --------------------------------------------------------------------------- models


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Config token ids, taken from the tokenizer so the two can never disagree."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


QWEN_EXTRA_EMBEDDING_ROWS = 5


def llama_policy_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Llama-3-shaped policy: GQA (4 heads of 64 on hidden 128, 2 KV heads, so TP=2 splits
    whole KV heads and head_dim != hidden/heads is exercised) and llama3 RoPE scaling."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=384,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        dtype="float32",
        **_token_ids(tokenizer),
    )


def qwen2_policy_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """Qwen2-shaped policy: q/k/v biases and tied embeddings, which Llama lacks.

    Like the real Qwen2.5 checkpoints, the embedding has more rows than the tokenizer has
    tokens (here 5 more, so the vocab is not a multiple of 128 and Megatron's TP padding is
    exercised by every test that uses this model).
    """
    return Qwen2Config(
        vocab_size=len(tokenizer) + QWEN_EXTRA_EMBEDDING_ROWS,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=352,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        dtype="float32",
        **_token_ids(tokenizer),
    )


def llama_rm_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Reward model body; pad_token_id lets HF locate each sequence's last real token."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=384,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        num_labels=1,
        dtype="float32",
        **_token_ids(tokenizer),
    )


@torch.no_grad()
def reinitialise(model: PreTrainedModel) -> None:
    """Overwrite every parameter with non-trivial random values.

    HF init leaves norms at exactly 1 and biases at 0, which would hide conversion bugs
    that drop or transpose them; jittering them makes such bugs change the logits.
    A sequence-classification ``score`` head gets a large std so rewards spread out.
    """
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, INIT_STD)
        elif name == "score.weight":
            param.normal_(0.0, RM_HEAD_STD)
        elif param.dim() == 1:  # RMSNorm weights are the only 1-D non-bias parameters
            param.normal_(1.0, NORM_JITTER_STD)
        else:
            param.normal_(0.0, INIT_STD)


def build_model(
    model_cls: type[PreTrainedModel], config: LlamaConfig | Qwen2Config, seed: int
) -> PreTrainedModel:
    """Instantiate in float32 under a fixed seed and re-initialise the weights."""
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    reinitialise(model)
    return model.eval()


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Stop on <|eot_id|> (chat turns) and on <|end_of_text|> (base text), as Llama 3 does."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TEXT)],
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------- driver

# folder name -> (model class, config factory, seed offset k; seed + k seeds the model)
MODEL_SPECS: dict[
    str, tuple[type[PreTrainedModel], Callable[[PreTrainedTokenizerFast], LlamaConfig | Qwen2Config], int]
] = {
    "llama-policy": (LlamaForCausalLM, llama_policy_config, 0),
    "qwen2-policy": (Qwen2ForCausalLM, qwen2_policy_config, 1),
    "llama-rm": (LlamaForSequenceClassification, llama_rm_config, 2),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files_under(folders: dict[str, Path]) -> Iterator[Path]:
    """Only the folders we built, so unrelated files in a reused ``--out`` are not listed."""
    return (p for folder in folders.values() for p in folder.rglob("*") if p.is_file())


def write_manifest(out_dir: Path, folders: dict[str, Path], seed: int, vocab_size: int) -> Path:
    """Record what was built so tests and humans can check provenance and integrity."""
    manifest = {
        "seed": seed,
        "vocab_size": vocab_size,
        "folders": sorted(folders),
        "sha256": {p.relative_to(out_dir).as_posix(): _sha256(p) for p in _files_under(folders)},
    }
    path = out_dir / "MANIFEST.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def build_tiny_models(out_dir: Path, seed: int = 0, vocab_size: int = 1024) -> dict[str, Path]:
    """Write the tokenizer and the three tiny models under ``out_dir``; return name -> folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    folders = {"tokenizer": out_dir / "tokenizer"}
    tokenizer.save_pretrained(folders["tokenizer"])
    print(f"{'tokenizer':14s} {'byte-level BPE':32s} vocab={len(tokenizer)}")
    for name, (model_cls, make_config, offset) in MODEL_SPECS.items():
        model = build_model(model_cls, make_config(tokenizer), seed + offset)
        if model.can_generate():
            model.generation_config = generation_config(tokenizer)
        folder = out_dir / name
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:14s} {type(model).__name__:32s} params={n_params:,} vocab={model.config.vocab_size}")
    write_manifest(out_dir, folders, seed, vocab_size)
    return folders


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="base seed for model weights")
    parser.add_argument("--vocab-size", type=int, default=1024, help="total vocab incl. special tokens")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    disable_progress_bar()  # per-shard "Writing model shards" bars only add noise here
    start = time.perf_counter()
    folders = build_tiny_models(args.out, seed=args.seed, vocab_size=args.vocab_size)
    print(f"wrote {len(folders)} folders + MANIFEST.json to {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
