import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The slowest modules first. pytest-xdist's loadscope hands modules (and test classes) to the
# workers in collection order, so a slow one collected last (alphabetically) runs alone at the
# end while the other worker idles: the suite's wall time is its busier worker's. Longest first
# is the classic fix (LPT scheduling). Order measured on the 2-core CI machine; a module not
# listed keeps its place after these.
SLOWEST_FIRST = (
    "test_fault_campaign.py", "test_slurm.py", "test_rollout_vllm_engine.py", "test_two_nodes.py", "test_train_state.py",
    "test_rlmt_train.py", "test_train_step.py", "test_loss_functions.py", "test_faults.py", "test_convert_cli.py",
    "test_parity.py", "test_run_folder.py", "test_sglang_protocol.py", "test_rollout_hf_engine.py",
    "test_partial_rollouts.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable: a module's order is kept


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The project's tiny HF models (Llama policy, Qwen2 policy, Llama RM), built once."""
    from rlmt_megatron.testing.tiny_models import build_tiny_models

    out = tmp_path_factory.mktemp("tiny")
    build_tiny_models(out, seed=0)
    return out


@pytest.fixture(scope="session")
def test_sequences(tmp_path_factory, tiny_models) -> tuple[Path, list[list[int]]]:
    """Token sequences of varied lengths: random ids plus a real chat rendered by the template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-policy"))
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Plan a short trip."}, {"role": "assistant", "content": "<think>\nfirst\n</think>\n\nGo north."}],
        tokenize=False,
    )
    g = torch.Generator().manual_seed(7)
    seqs = [tok(chat, add_special_tokens=False)["input_ids"]]
    seqs += [torch.randint(0, len(tok), (n,), generator=g).tolist() for n in (2, 9, 17, 31, 5, 12)]
    path = tmp_path_factory.mktemp("seqs") / "sequences.json"
    path.write_text(json.dumps(seqs))
    return path, seqs


@pytest.fixture(scope="module")
def world_of_one():
    """This test process as a one-rank world (gloo, CPU compat layer), torn down afterwards."""
    from rlmt_megatron.config.model_build import ModelBuildConfig
    from rlmt_megatron.distributed import bootstrap

    build = ModelBuildConfig()
    bootstrap.initialize(build.parallel)
    yield build
    bootstrap.shutdown()


@pytest.fixture(scope="session")
def sglang_python():
    """The python of a side env holding the real sglang 0.5.23 (``tests/sglang_side_env.py``):
    built once per machine (cached, keyed by version), then reused."""
    import sglang_side_env

    python, seconds = sglang_side_env.ensure()
    if seconds:
        print(f"\nsglang {sglang_side_env.SGLANG_VERSION} side env built in {seconds:.1f}s at {python.parent.parent}")
    return python
