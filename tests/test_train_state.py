"""Training-state checkpoints: resume is bit-exact, atomic, and refuses what it cannot do.

Resume (torchrun, tests/workers/train_state_worker.py): one job trains 4 steps straight and,
from a fresh engine, 2 steps + save; a NEW job (other seeds) loads the checkpoint and trains
2 steps. Weights (exported HF tensors), lr, loss, grad norm and per-rank RNG draws must equal
the straight run's exactly, at TP2 x DP2 with the distributed optimizer and at PP2 without it.
Warmup + cosine make the lr change every step; AdamW's moments and bias correction make the
update depend on the restored optimizer state.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import torchrun
from rlmt_megatron.checkpoint import train_state as ts
from rlmt_megatron.errors import CheckpointError, DamagedCheckpointError
from rlmt_megatron.trainer.run_folder import load_resume_state

RUNS = {
    "tp2-dp2-distopt": (4, ["--tp", "2"]),
    "pp2-plainopt": (2, ["--pp", "2", "--no-distributed-optimizer"]),
}
_results: dict = {}


def resume_run(name, tiny_models, tmp_path_factory):
    """(first job's output, resumed job's output, checkpoint root), run once per session."""
    if name not in _results:
        nproc, extra = RUNS[name]
        work = tmp_path_factory.mktemp(f"train_state-{name}")
        ckpt = work / "ckpt"
        stale = ckpt / "step_00000001.tmp"  # left by a "crashed" save: must go at the next save
        stale.mkdir(parents=True)
        (stale / "junk").write_text("x")
        common = ["tests/workers/train_state_worker.py", "--model", str(tiny_models / "llama-policy"),
                  "--ckpt", str(ckpt), *extra]
        torchrun(nproc, [*common, "--mode", "first", "--out", str(work / "first.pt")])
        torchrun(nproc, [*common, "--mode", "resume", "--out", str(work / "resumed.pt")])
        _results[name] = (torch.load(work / "first.pt"), torch.load(work / "resumed.pt"), ckpt)
    return _results[name]


@pytest.mark.parametrize("name", list(RUNS))
def test_resume_is_bit_exact(name, tiny_models, tmp_path_factory):
    first, resumed, _ = resume_run(name, tiny_models, tmp_path_factory)
    straight, got = first["straight_state"], resumed["resumed_state"]
    assert sorted(straight) == sorted(got)
    assert not all(torch.equal(first["first_state"][k], got[k]) for k in got)  # training moved on
    assert all(got[k].dtype == torch.float32 and torch.equal(straight[k], got[k]) for k in got)
    assert first["first_history"] == first["straight_history"][:2]  # both halves start alike
    tail = first["straight_history"][2:]
    for key in ("lr", "loss", "grad_norm"):
        assert [h[key] for h in resumed["resumed_history"]] == [h[key] for h in tail], key
    assert len({h["lr"] for h in first["straight_history"]}) == 4  # the schedule moves every step
    assert resumed["step_count_after_load"] == 2 and resumed["step_count"] == 4
    assert resumed["extra"] == {"step": 2, "weight_version": 2, "sampler": {"pos": 5}}


@pytest.mark.parametrize("name", list(RUNS))
def test_rng_restored_per_rank(name, tiny_models, tmp_path_factory):
    first, resumed, _ = resume_run(name, tiny_models, tmp_path_factory)
    draws = first["straight_draws"]
    assert resumed["resumed_draws"] == draws
    assert len({tuple(d[:3]) for d in draws}) == len(draws)  # ranks hold different states


@pytest.mark.parametrize("name", list(RUNS))
def test_checkpoint_folder(name, tiny_models, tmp_path_factory):
    _, _, ckpt = resume_run(name, tiny_models, tmp_path_factory)
    nproc = RUNS[name][0]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002"]  # stale .tmp cleaned
    step = ckpt / "step_00000002"
    assert (step / ts.COMPLETE_NAME).is_file()
    assert sorted(p.name for p in (step / ts.RNG_DIR).iterdir()) == [f"rank_{r:05d}.pt" for r in range(nproc)]
    meta = json.loads((step / ts.STATE_NAME).read_text())
    assert meta["world_size"] == nproc and meta["step"] == 2
    assert meta["roles"]["policy"]["step_count"] == 2 and meta["roles"]["policy"]["adam_step"] == 2.0
    assert ts.latest_checkpoint(ckpt) == step


# ---------------------------------------------------------------------------------------------
# In this process (a world of one)


def _engine(tiny_models, build, role="policy", **optim):
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
    from rlmt_megatron.runner.model_runner import ModelRunner

    cfg = dict(lr=0.02, weight_decay=0.01) | optim
    return ModelRunner(load_model(tiny_models / "llama-policy", role, build), OptimConfig(**cfg),
                       BatchingConfig(train_tokens_per_microbatch=1 << 20))


def _roles(tiny_models, build, **optim):
    return {"policy": _engine(tiny_models, build, **optim), "critic": _engine(tiny_models, build, "critic")}


def _hf_state(engine):
    from rlmt_megatron.checkpoint.hf_export import gather_hf_state_dict

    return gather_hf_state_dict(engine.built)


def test_role_folder_is_a_model_checkpoint_at_another_layout(tiny_models, tmp_path_factory, world_of_one):
    """step_X/policy/model of the TP2 x DP2 run loads as a plain model checkpoint at 1x1."""
    from rlmt_megatron.checkpoint.hf_export import gather_hf_state_dict
    from rlmt_megatron.checkpoint.load import load_model

    first, _, ckpt = resume_run("tp2-dp2-distopt", tiny_models, tmp_path_factory)
    built = load_model(ckpt / "step_00000002" / "policy" / "model", "policy", world_of_one)
    got = gather_hf_state_dict(built)
    assert all(torch.equal(got[k], first["first_state"][k]) for k in first["first_state"])


def test_other_layout_is_refused(tiny_models, tmp_path_factory, world_of_one):
    _, _, ckpt = resume_run("tp2-dp2-distopt", tiny_models, tmp_path_factory)
    engine = _engine(tiny_models, world_of_one)
    with pytest.raises(CheckpointError) as e:
        ts.load_train_state(ckpt / "step_00000002", {"policy": engine})
    msg = str(e.value)
    assert "world size 4 (checkpoint) vs 1 (this job)" in msg and "policy.tp 2 (checkpoint) vs 1" in msg
    assert "policy.dp 2 (checkpoint) vs 1" in msg and "policy.pp" not in msg


@pytest.fixture(scope="module")
def saved_1x1(tiny_models, tmp_path_factory, world_of_one):
    """A 1x1 checkpoint (distributed optimizer) of a policy trained one step and a critic never
    stepped, with both roles' weights at the save."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from train_worker import global_batch, nll_token_mean

    root = tmp_path_factory.mktemp("ts1x1")
    (root / "step_00000007.tmp").mkdir()
    engines = _roles(tiny_models, world_of_one)
    engines["policy"].train_step(global_batch(1024), nll_token_mean)
    path = ts.save_train_state(root, 1, engines, {"step": 1})
    return path, {role: _hf_state(e) for role, e in engines.items()}


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_save_cleans_stale_tmp_and_loads_back(saved_1x1, tiny_models, world_of_one):
    path, weights = saved_1x1
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_00000001"]
    engines = _roles(tiny_models, world_of_one)
    assert ts.load_train_state(path, engines) == {"step": 1}
    for role, engine in engines.items():
        got = _hf_state(engine)
        assert all(torch.equal(got[k], weights[role][k]) for k in weights[role]), role
    assert engines["policy"].step_count == 1 and engines["critic"].step_count == 0
    assert engines["policy"].scheduler.num_steps == 2 and engines["critic"].scheduler.num_steps == 1


def test_missing_role_and_extra_role(saved_1x1, tiny_models, world_of_one):
    path, _ = saved_1x1
    engines = _roles(tiny_models, world_of_one)
    with pytest.raises(CheckpointError, match=r"role\(s\) \['reward'\] are missing from the checkpoint "
                                              r"\(it holds \['critic', 'policy'\]\)"):
        ts.load_train_state(path, {**engines, "reward": engines["critic"]})
    with pytest.raises(CheckpointError, match=r"also holds role\(s\) \['critic'\] that this job does not train"):
        ts.load_train_state(path, {"policy": engines["policy"]})


def test_damaged_checkpoints_name_the_file(saved_1x1, tiny_models, world_of_one, tmp_path):
    path, _ = saved_1x1
    engines = _roles(tiny_models, world_of_one)

    d = _copy(path, tmp_path / "a")
    (d / ts.COMPLETE_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"{d / ts.COMPLETE_NAME}: missing"):
        ts.load_train_state(d, engines)

    d = _copy(path, tmp_path / "b")
    (d / ts.STATE_NAME).write_text('{"step": 1,')
    with pytest.raises(DamagedCheckpointError, match=rf"{d / ts.STATE_NAME}: line 1: not valid JSON"):
        ts.load_train_state(d, engines)

    d = _copy(path, tmp_path / "c")
    ts.rng_file(d, 0).unlink()
    with pytest.raises(DamagedCheckpointError, match=rf"{ts.rng_file(d, 0)}: missing"):
        ts.load_train_state(d, engines)

    d = _copy(path, tmp_path / "d")
    (d / ts.EXTRA_NAME).unlink()
    with pytest.raises(DamagedCheckpointError, match=rf"{d / ts.EXTRA_NAME}: missing"):
        ts.load_train_state(d, engines)

    d = _copy(path, tmp_path / "e")
    shutil.rmtree(d / "critic" / "model")
    with pytest.raises(DamagedCheckpointError, match=rf"{d / 'critic' / 'model'}: missing"):
        ts.load_train_state(d, engines)


@pytest.mark.parametrize("part", ["model", "optimizer"])
def test_corrupt_tensor_file_names_the_folder(saved_1x1, tiny_models, world_of_one, tmp_path, part):
    path, _ = saved_1x1
    d = _copy(path, tmp_path)
    shards = sorted((d / "policy" / part).glob("*.distcp"))
    assert shards
    for shard in shards:
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DamagedCheckpointError, match=rf"{d / 'policy'}(/model)?: cannot load the Megatron checkpoint"):
        ts.load_train_state(d, _roles(tiny_models, world_of_one))


def test_resume_passes_over_a_damaged_newest_checkpoint_only(saved_1x1, tiny_models, world_of_one, tmp_path, capsys):
    """run.resume=auto: a damaged newest checkpoint gives way to the one before it, saying so and
    leaving it in place; a checkpoint that does not fit the job, or one named explicitly, does not."""
    path, weights = saved_1x1
    out = tmp_path / "run"
    good, newest = out / "checkpoints" / "step_00000001", out / "checkpoints" / "step_00000002"
    shutil.copytree(path, good)
    shutil.copytree(path, newest)
    (newest / ts.EXTRA_NAME).write_text('{"step": 2}')  # what the fallback must not return
    shard = sorted((newest / "policy" / "model").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    engines = _roles(tiny_models, world_of_one)
    assert load_resume_state(out, "auto", engines) == (good, {"step": 1})
    assert f"warning: checkpoint {newest} is damaged ({newest / 'policy'}: cannot load" in capsys.readouterr().err
    assert all(torch.equal(_hf_state(engines["policy"])[k], weights["policy"][k]) for k in weights["policy"])
    assert newest.is_dir() and shard.stat().st_size == 100  # left for inspection

    with pytest.raises(DamagedCheckpointError, match=rf"{newest / 'policy'}: cannot load"):
        load_resume_state(out, str(newest), engines)  # an explicit path is never swapped for another
    assert load_resume_state(out, "never", engines) == (None, None)

    (good / ts.RNG_DIR / "rank_00000.pt").write_bytes(b"garbage")
    with pytest.raises(DamagedCheckpointError) as info:
        load_resume_state(out, "auto", engines)
    assert str(info.value).startswith(f"no complete checkpoint under {out / 'checkpoints'} could be loaded: "
                                      f"step_00000002: {newest / 'policy'}: cannot load")
    assert f"; step_00000001: {ts.rng_file(good, 0)}: cannot be read" in str(info.value)

    shutil.rmtree(newest)
    shutil.copytree(path, newest)
    state = json.loads((newest / ts.STATE_NAME).read_text())
    state["world_size"] = 4
    (newest / ts.STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="saved with a different layout: world size 4") as info:
        load_resume_state(out, "auto", engines)  # not damage: an older checkpoint would not fit either
    assert not isinstance(info.value, DamagedCheckpointError)


def test_sgd_momentum_resumes_exactly(tiny_models, world_of_one, tmp_path):
    """Plain optimizer, SGD with momentum (Megatron has no state initialiser for it): 3 steps in
    one go equal 2 steps, save, load into a fresh engine, 1 step."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from train_worker import global_batch, nll_token_mean

    optim = dict(optimizer="sgd", sgd_momentum=0.9, lr=0.05, use_distributed_optimizer=False)
    batch = global_batch(1024)
    straight, halves = _engine(tiny_models, world_of_one, **optim), _engine(tiny_models, world_of_one, **optim)
    for _ in range(2):
        straight.train_step(batch, nll_token_mean)
        halves.train_step(batch, nll_token_mean)
    path = ts.save_train_state(tmp_path, 2, {"policy": halves}, {})
    resumed = _engine(tiny_models, world_of_one, **optim)
    ts.load_train_state(path, {"policy": resumed})
    straight.train_step(batch, nll_token_mean)
    resumed.train_step(batch, nll_token_mean)
    want, got = _hf_state(straight), _hf_state(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_changed_schedule_or_optimizer_is_refused(saved_1x1, tiny_models, world_of_one):
    path, _ = saved_1x1
    with pytest.raises(CheckpointError, match=r"learning-rate schedule differs.*max_lr 0.02 \(checkpoint\) vs 0.03"):
        ts.load_train_state(path, _roles(tiny_models, world_of_one, lr=0.03))
    with pytest.raises(CheckpointError, match=r"policy.use_distributed_optimizer True \(checkpoint\) vs False"):
        ts.load_train_state(path, _roles(tiny_models, world_of_one, use_distributed_optimizer=False))


def test_save_refuses_bad_extra_before_writing(saved_1x1, tiny_models, world_of_one, tmp_path):
    engine = _engine(tiny_models, world_of_one)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        ts.save_train_state(tmp_path / "ck", 3, {"policy": engine}, {"bad": object()})
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------------------------------------
# Finding and pruning (filesystem only)


def _fake(root: Path, name: str, complete: bool = True) -> Path:
    p = root / name
    p.mkdir(parents=True)
    if complete:
        (p / ts.COMPLETE_NAME).write_text("{}")
    return p


def test_latest_checkpoint_skips_tmp_and_incomplete(tmp_path):
    assert ts.latest_checkpoint(tmp_path / "absent") is None
    assert ts.latest_checkpoint(tmp_path) is None
    _fake(tmp_path, "step_00000003")
    _fake(tmp_path, "step_00000010")
    _fake(tmp_path, "step_00000020.tmp")  # even with a marker: an unfinished rename
    _fake(tmp_path, "step_00000030", complete=False)  # marker never written
    _fake(tmp_path, "step_40")  # not our name pattern
    (tmp_path / "step_00000050").write_text("a file, not a folder")
    assert ts.latest_checkpoint(tmp_path) == tmp_path / "step_00000010"
    assert [s for s, _ in ts.list_checkpoints(tmp_path)] == [3, 10]


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_prune_keeps_exactly_the_newest_k(tmp_path, keep):
    steps = [1, 2, 3, 10, 11]
    for s in steps:
        _fake(tmp_path, ts.step_dir_name(s))
    _fake(tmp_path, "step_00000012.tmp", complete=False)
    _fake(tmp_path, "step_00000000", complete=False)
    removed = ts.prune_checkpoints(tmp_path, keep)
    assert sorted(removed) == [tmp_path / ts.step_dir_name(s) for s in steps[:-keep]]
    assert [s for s, _ in ts.list_checkpoints(tmp_path)] == steps[-keep:]
    assert (tmp_path / "step_00000012.tmp").is_dir() and (tmp_path / "step_00000000").is_dir()


def test_prune_rejects_keep_zero(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        ts.prune_checkpoints(tmp_path, 0)


def _finished_run(tiny_models, world_of_one, tmp_path, **optim):
    """A policy trained over its whole schedule (total_steps=2), saved at its last step."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from train_worker import global_batch, nll_token_mean

    engine = _engine(tiny_models, world_of_one, total_steps=2, **optim)
    for _ in range(2):
        engine.train_step(global_batch(1024), nll_token_mean)
    return ts.save_train_state(tmp_path, 2, {"policy": engine}, {})


def test_extending_a_constant_lr_run_is_allowed(tiny_models, world_of_one, tmp_path):
    """run.total_steps sets optim.total_steps (the decay length): with a constant schedule it
    changes no learning rate, so a finished run can be extended."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from train_worker import global_batch, nll_token_mean

    path = _finished_run(tiny_models, world_of_one, tmp_path, lr_schedule="constant")
    resumed = _engine(tiny_models, world_of_one, total_steps=4, lr_schedule="constant")
    ts.load_train_state(path, {"policy": resumed})
    assert resumed.scheduler.num_steps == 3 and resumed.step_count == 2
    # The extended length is what this job runs with (and what its next save records).
    assert resumed.scheduler.lr_decay_steps == 4
    for _ in range(2):
        metrics = resumed.train_step(global_batch(1024), nll_token_mean)
        assert metrics["lr"] == 0.02  # optim.lr: a constant schedule
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [0.02] * len(resumed.optimizer.param_groups)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_changing_a_decay_length_is_refused(tiny_models, world_of_one, tmp_path, schedule):
    path = _finished_run(tiny_models, world_of_one, tmp_path, lr_schedule=schedule, min_lr=0.001)
    resumed = _engine(tiny_models, world_of_one, total_steps=4, lr_schedule=schedule, min_lr=0.001)
    with pytest.raises(CheckpointError) as e:
        ts.load_train_state(path, {"policy": resumed})
    msg = str(e.value)
    assert "lr_decay_steps 2 (checkpoint) vs 4 (this job)" in msg
    assert f"the {schedule} schedule" in msg and "optim.total_steps=2" in msg
