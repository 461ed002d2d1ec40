"""Training-state checkpoints: everything a run needs to continue exactly where it stopped.

One checkpoint is a folder ``<ckpt_root>/step_XXXXXXXX/``::

    COMPLETE                 written last; a folder without it is never resumed from
    train_state.json         format version, step, world size, per-role layout, scheduler, step count
    extra.json               the caller's JSON-able dict (sampler position, weight version, ...)
    rng/rank_XXXXX.pt        this rank's python / numpy / torch (CPU, CUDA) / Megatron tracker RNG
    <role>/model/            the weights, as dist_ckpt.save_model_checkpoint writes them: a model
                             checkpoint that loads at any layout (load_model, rlmt-convert)
    <role>/optimizer/        Megatron dist checkpoint of the optimizer state (empty until the
                             role's first step)

Atomicity: every rank writes into ``step_XXXXXXXX.tmp/``; once all ranks agree that they
finished, rank 0 writes ``COMPLETE`` and renames the folder. A crash leaves only a ``.tmp`` folder
(or nothing), which :func:`latest_checkpoint` never returns and the next save deletes. A write
that fails (a full disk) fails the save on every rank with one CheckpointError saying how much
room is left, and the ``.tmp`` folder is removed at once. All ranks must see the same
``ckpt_root`` (a shared filesystem on multi-node jobs).

Damage after the save (a file of a complete checkpoint missing or unreadable) loads as
:class:`DamagedCheckpointError`; ``trainer/run_folder.load_resume_state`` then resumes from the
checkpoint before it.

Resume needs the same world size and, per role, the same TP / PP / VPP / DP, optimizer type and
distributed-optimizer setting: the distributed optimizer's shards are stored in its own bucket
layout ("dp_reshardable", Megatron-LM's default, no communication on save or load) and the RNG
states are per rank. A different layout is refused with what differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from rlmt_megatron.distributed.collectives import all_ranks_ok, barrier, world_rank, world_size
from rlmt_megatron.checkpoint.rng_state import capture_rng_state, restore_rng_state
from rlmt_megatron.checkpoint.safetensors_io import fsync_path
from rlmt_megatron.errors import CheckpointError, DamagedCheckpointError

if TYPE_CHECKING:
    from rlmt_megatron.runner.model_runner import ModelRunner

FORMAT_VERSION = 1
COMPLETE_NAME = "COMPLETE"
STATE_NAME = "train_state.json"
EXTRA_NAME = "extra.json"
RNG_DIR = "rng"
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
TMP_SUFFIX = ".tmp"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_ROLE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# Distributed-optimizer state format (see DistributedOptimizer.sharded_state_dict): one tensor per
# bucket shard, read and written by each rank alone; resharding only along DP, which we refuse anyway.
_DIST_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
# Fields of the saved layout that must equal the current job's for a resume.
_LAYOUT_KEYS = ("tp", "pp", "vpp", "dp", "params_dtype", "padded_vocab_size", "optimizer", "use_distributed_optimizer")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(ckpt_dir: str | Path, rank: int) -> Path:
    return Path(ckpt_dir) / RNG_DIR / f"rank_{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------
# Finding and pruning (plain filesystem, no collectives)


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_root`` as ``(step, path)``, oldest first.

    Only ``step_XXXXXXXX`` folders holding a ``COMPLETE`` marker count: ``.tmp`` folders of an
    interrupted save and folders without the marker are skipped.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> Optional[Path]:
    """The complete checkpoint with the highest step under ``ckpt_root``, or None."""
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns the deleted folders.

    Call it on one rank (rank 0) after a save; on other ranks of a distributed job it does
    nothing, so calling it everywhere is also safe. Incomplete folders are left to the next save.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    if world_rank() != 0:
        return []
    doomed = [p for _, p in list_checkpoints(ckpt_root)[:-keep_last]]
    for p in doomed:
        # Drop the marker first: a deletion cut short leaves a folder nobody resumes from.
        (p / COMPLETE_NAME).unlink(missing_ok=True)
        shutil.rmtree(p)
    return doomed


# ---------------------------------------------------------------------------------------------
# Small helpers


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_durable(path, (json.dumps(obj, indent=2) + "\n").encode())


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DamagedCheckpointError(f"{path}: missing (the checkpoint is incomplete or not a training-state checkpoint)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DamagedCheckpointError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DamagedCheckpointError(f"{path}: not UTF-8 text ({e})") from None


# ---------------------------------------------------------------------------------------------
# Per-role state


def _layout(engine: "ModelRunner") -> dict[str, Any]:
    """What a resume must match, for one role, in this job."""
    from megatron.core import parallel_state

    par = engine.built.build.parallel
    cfg = engine.optim_config
    return {
        "tp": par.tp,
        "pp": par.pp,
        "vpp": par.vpp,
        "dp": parallel_state.get_data_parallel_world_size(),
        "params_dtype": engine.built.build.precision.params_dtype,
        "padded_vocab_size": engine.built.padded_vocab_size,
        "optimizer": cfg.optimizer if engine.optimizer is not None else None,
        "use_distributed_optimizer": bool(cfg.use_distributed_optimizer) if engine.optimizer is not None else None,
    }


def _has_optimizer_state(engine: "ModelRunner") -> bool:
    # A never-stepped optimizer holds nothing to restore, and Megatron's distributed optimizer
    # cannot even build its state dict then (it reads the step of an empty torch Adam state).
    return engine.optimizer is not None and engine.step_count > 0


def _optimizer_sharded_state(engine: "ModelRunner", is_loading: bool) -> dict:
    """The optimizer's sharded state, in a folder of its own beside the model checkpoint (which
    is then exactly what dist_ckpt.save_model_checkpoint writes)."""
    chunks = engine.built.chunks
    # The plain optimizer keys its tensors by the model's sharded tensors; not saved from here.
    model = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    return {"optimizer": engine.optimizer.sharded_state_dict(
        model, is_loading=is_loading, metadata=dict(_DIST_OPT_METADATA))}


def _inner_torch_optimizers(engine: "ModelRunner") -> list:
    opt = engine.optimizer
    wrapped = getattr(opt, "chained_optimizers", [opt])
    return [getattr(w, "optimizer", None) for w in wrapped]


def _prime_optimizer_state(engine: "ModelRunner") -> None:
    """Give a never-stepped torch optimizer its (zero) state before a load.

    The state dict that Megatron loads into is built from the live optimizer state, which a
    fresh torch optimizer does not have yet (Apex / Transformer Engine optimizers allocate it
    up front; torch's, used on CPU or without TE, do not): the distributed optimizer then fails
    reading Adam's step, and the plain optimizer would load no momentum for SGD (for which
    Megatron has no init_state_fn at all). Zeros are placeholders only: the load overwrites
    them; no parameter is touched (a dummy step would apply weight decay).
    """
    for wrapper in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        if getattr(wrapper, "init_state_fn", 0) is None:  # FP32Optimizer calls it on load
            wrapper.init_state_fn = lambda opt, config=None: None
    for opt in _inner_torch_optimizers(engine):
        if not isinstance(opt, torch.optim.Optimizer) or len(opt.state) > 0:
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                    opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p.data),
                                        exp_avg_sq=torch.zeros_like(p.data))
                elif isinstance(opt, torch.optim.SGD) and group["momentum"] != 0:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)


def _adam_step(engine: "ModelRunner") -> Optional[float]:
    """The step counter torch's Adam keeps per parameter (one value for all), or None."""
    steps = {float(st["step"]) for opt in _inner_torch_optimizers(engine)
             for st in getattr(opt, "state", {}).values() if isinstance(st.get("step"), torch.Tensor)}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the Adam step count: {sorted(steps)}")
    return steps.pop() if steps else None


def _restore_step_counters(engine: "ModelRunner", step: Optional[float]) -> None:
    """Give every parameter its own Adam ``step`` tensor holding the saved count.

    Without Apex / TE, Megatron's distributed optimizer restores the step wrongly: it puts one
    shared tensor into every parameter's state (torch's Adam then increments it once per
    parameter) and the dp_reshardable load copies the pre-load step back over it. The count
    saved in train_state.json is the truth; with TE the step lives in the param groups and
    no state carries one, so nothing is touched.
    """
    for opt in _inner_torch_optimizers(engine):
        for st in getattr(opt, "state", {}).values():
            if isinstance(st.get("step"), torch.Tensor):
                if step is None:
                    raise CheckpointError("the checkpoint has no Adam step count but this optimizer keeps one")
                st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)


# ---------------------------------------------------------------------------------------------
# Save


def _check_save_args(step: int, engines: dict, extra: dict) -> str:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not engines:
        raise ValueError("engines is empty: nothing to checkpoint")
    for role in engines:
        if not _ROLE_NAME.match(role):
            raise ValueError(f"role name {role!r} must be letters, digits, '_' or '-' (it names a folder)")
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        return json.dumps(extra, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra is not JSON-serialisable: {e}") from None


def _clean_stale_tmp(root: Path) -> None:
    """Delete ``*.tmp`` folders left by interrupted saves (rank 0, before anyone writes)."""
    for p in root.iterdir():
        if p.name.endswith(TMP_SUFFIX) and p.is_dir():
            shutil.rmtree(p)


def _last_line(error: BaseException) -> str:
    """An error in one line: Megatron's write failures carry every rank's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _storage_hint(root: Path) -> str:
    """Room left to write under ``root``. A full disk or a file-size limit surfaces from torch's
    writers as opaque errors ("unexpected pos 704 vs 598"), so say what the OS reports."""
    facts = []
    with contextlib.suppress(OSError):
        facts.append(f"{shutil.disk_usage(root).free / 2**30:.2f} GiB free on its filesystem")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        facts.append(f"a file-size limit (ulimit -f) of {limit} bytes")
    return f"; {' and '.join(facts)}: a full disk or a file-size limit fails writes like this" if facts else ""


def save_train_state(ckpt_root: str | Path, step: int, engines: dict[str, "ModelRunner"], extra: dict) -> Path:
    """Save every role's weights, optimizer, scheduler and step count, this job's RNG states
    (per rank) and ``extra`` to ``<ckpt_root>/step_{step:08d}``. Collective over all ranks.

    ``extra`` must be JSON-able and the same on every rank (rank 0's copy is written). An
    existing complete checkpoint of the same step is replaced only once the new one is complete.
    Returns the checkpoint folder.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from rlmt_megatron.checkpoint.dist_ckpt import save_model_checkpoint, writer_survives_stop_signals

    extra_text = _check_save_args(step, engines, extra)
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = root / (final.name + TMP_SUFFIX)
    rank, world = world_rank(), world_size()
    layouts = {role: _layout(e) for role, e in engines.items()}

    error: Optional[BaseException] = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _clean_stale_tmp(root)
            for role in engines:
                (tmp / role / OPTIMIZER_DIR).mkdir(parents=True)
            (tmp / RNG_DIR).mkdir()
        except OSError as e:
            error = e
    if not all_ranks_ok(error is None):
        raise CheckpointError(f"{tmp}: cannot create the checkpoint folder ({error or 'failed on rank 0'})")

    try:
        for role in sorted(engines):  # same order on every rank: each save is a collective
            engine = engines[role]
            save_model_checkpoint(engine.built, tmp / role / MODEL_DIR)
            if _has_optimizer_state(engine):
                with writer_survives_stop_signals():  # a stop signal must not kill the writer's helpers
                    dist_checkpointing.save(_optimizer_sharded_state(engine, is_loading=False),
                                            str(tmp / role / OPTIMIZER_DIR))
        torch.save(capture_rng_state(), rng_file(tmp, rank))
        with open(rng_file(tmp, rank), "rb+") as f:
            os.fsync(f.fileno())
        if rank == 0:
            roles = {}
            for role, engine in engines.items():
                roles[role] = {
                    **layouts[role],
                    "scheduler": engine.scheduler.state_dict() if engine.scheduler is not None else None,
                    "step_count": engine.step_count,
                    "optimizer_state": _has_optimizer_state(engine),
                    "adam_step": _adam_step(engine) if engine.optimizer is not None else None,
                }
            _write_json(tmp / STATE_NAME, {
                "format_version": FORMAT_VERSION, "step": step, "world_size": world, "roles": roles,
            })
            _write_durable(tmp / EXTRA_NAME, extra_text.encode())
    # any failure must reach every rank, not hang them (Megatron's writes fail collectively, with
    # torch DCP's CheckpointException, a BaseException)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        error = e
    if not all_ranks_ok(error is None):
        if rank == 0:  # nothing in it is usable; on a full disk its space is what the next save needs
            shutil.rmtree(tmp, ignore_errors=True)
        where = f"rank {rank}: {_last_line(error)}" if error else "another rank failed"
        raise CheckpointError(f"{tmp}: writing the checkpoint failed ({where}){_storage_hint(root)}; the unfinished "
                              "folder was removed, earlier checkpoints are untouched")

    if rank == 0:  # every rank has finished writing: publish
        for sub in [tmp / RNG_DIR, *(tmp / role / d for role in engines for d in (MODEL_DIR, OPTIMIZER_DIR))]:
            fsync_path(sub)
        _write_json(tmp / COMPLETE_NAME, {"step": step, "world_size": world})
        fsync_path(tmp)
        old = root / (final.name + ".replaced" + TMP_SUFFIX)
        if final.exists():
            # The old copy goes out of the way under a .tmp name (ignored, cleaned next save).
            (final / COMPLETE_NAME).unlink(missing_ok=True)
            final.rename(old)
        tmp.rename(final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# ---------------------------------------------------------------------------------------------
# Load


def read_train_state_meta(ckpt_dir: str | Path) -> dict:
    """``train_state.json`` of a complete checkpoint, checked for the fields resume needs."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (expected a training-state checkpoint folder step_XXXXXXXX)")
    if not (d / COMPLETE_NAME).is_file():
        raise CheckpointError(f"{d / COMPLETE_NAME}: missing: the save of this checkpoint did not finish; "
                              "resume from an earlier one")
    path = d / STATE_NAME
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{path}: expected a JSON object")
    for key in ("format_version", "step", "world_size", "roles"):
        if key not in meta:
            raise DamagedCheckpointError(f"{path}: field '{key}' is missing")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta['format_version']} is not supported (expected {FORMAT_VERSION})")
    for role, info in meta["roles"].items():
        for key in (*_LAYOUT_KEYS, "scheduler", "step_count", "optimizer_state", "adam_step"):
            if key not in info:
                raise DamagedCheckpointError(f"{path}: field 'roles.{role}.{key}' is missing")
    return meta


def check_compatible(meta: dict, world_size: int, layouts: dict[str, dict], where: str) -> None:
    """Refuse a resume whose roles or layout differ from the checkpoint's, saying what differs."""
    saved_roles, roles = set(meta["roles"]), set(layouts)
    if roles - saved_roles:
        raise CheckpointError(f"{where}: role(s) {sorted(roles - saved_roles)} are missing from the checkpoint "
                              f"(it holds {sorted(saved_roles)})")
    if saved_roles - roles:
        raise CheckpointError(f"{where}: the checkpoint also holds role(s) {sorted(saved_roles - roles)} that this "
                              f"job does not train (it trains {sorted(roles)}): resume with the same roles")
    diffs = []
    if meta["world_size"] != world_size:
        diffs.append(f"world size {meta['world_size']} (checkpoint) vs {world_size} (this job)")
    for role in sorted(roles):
        for key in _LAYOUT_KEYS:
            saved, now = meta["roles"][role][key], layouts[role][key]
            if saved != now:
                diffs.append(f"{role}.{key} {saved} (checkpoint) vs {now} (this job)")
    if diffs:
        raise CheckpointError(
            f"{where}: saved with a different layout: " + "; ".join(diffs) + ". Resuming at another layout is "
            "not supported (the distributed optimizer's shards and the per-rank RNG states follow it); "
            f"export the weights with `rlmt-convert mcore-to-hf --ckpt {where}/<role>/{MODEL_DIR}` and start a new run "
            "from them"
        )


def _decay_length_matters(saved: dict, now: dict) -> bool:
    """Whether the decay length (lr_decay_steps, from optim.total_steps) changes any learning
    rate: not under a constant schedule, whose lr is max_lr after warmup whatever the length."""
    return not (saved.get("lr_decay_style") == now["lr_decay_style"] == "constant")


def _check_scheduler(saved: dict, engine: "ModelRunner", role: str, where: Path) -> None:
    """The schedule's settings must match (num_steps, the position, comes from the checkpoint),
    except the decay length of a constant schedule, so that a finished run can be extended."""
    now = engine.scheduler.state_dict()
    ignored = {"num_steps"} | (set() if _decay_length_matters(saved, now) else {"lr_decay_steps"})
    diffs = [f"{k} {saved.get(k)!r} (checkpoint) vs {now[k]!r} (this job)" for k in now
             if k not in ignored and saved.get(k) != now[k]]
    if diffs:
        hint = ""
        if saved.get("lr_decay_steps") != now["lr_decay_steps"] and saved.get("lr_decay_style") == now["lr_decay_style"]:
            # The usual cause: run.total_steps raised to extend a run sets optim.total_steps.
            key = "critic_optim" if role == "critic" else "optim"
            hint = (f": the {now['lr_decay_style']} schedule decays to min_lr over lr_decay_steps, so another length changes "
                    f"the learning rate of every step after warmup; to extend the run with the checkpoint's schedule "
                    f"set {key}.total_steps={saved.get('lr_decay_steps')} explicitly (run.total_steps sets it "
                    "only when it is not given)")
        raise CheckpointError(f"{where / STATE_NAME}: role {role}: the learning-rate schedule differs from the "
                              "checkpoint's: " + "; ".join(diffs) + hint)


def _load_role(engine: "ModelRunner", role: str, info: dict, d: Path) -> None:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from rlmt_megatron.checkpoint.dist_ckpt import load_model_checkpoint

    role_dir = d / role
    for sub in (MODEL_DIR, OPTIMIZER_DIR):
        if not (role_dir / sub).is_dir():
            raise DamagedCheckpointError(f"{role_dir / sub}: missing (a folder of role {role})")
    try:
        load_model_checkpoint(engine.built, role_dir / MODEL_DIR)
        if engine.optimizer is not None and info["optimizer_state"]:
            _prime_optimizer_state(engine)
            state = dist_checkpointing.load(_optimizer_sharded_state(engine, is_loading=True),
                                            str(role_dir / OPTIMIZER_DIR))
            # no_grad: with float32 weights the distributed optimizer's main params are views of
            # the model's, and an in-place copy into a view of a leaf that requires grad is refused.
            with torch.no_grad():
                engine.optimizer.load_state_dict(state["optimizer"])
            _restore_step_counters(engine, info["adam_step"])
    except CheckpointError:
        raise
    # torch DCP's CheckpointException derives from BaseException; Megatron raises many types.
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        raise DamagedCheckpointError(f"{role_dir}: cannot load the Megatron checkpoint of role {role} "
                                     f"({_last_line(e)})") from None
    if engine.scheduler is not None:
        # OptimizerParamScheduler.load_state_dict *adds* the saved num_steps (via step()); the
        # engine's fresh scheduler already stands at 1, so start it from 0.
        engine.scheduler.num_steps = 0
        saved = dict(info["scheduler"])
        if not _decay_length_matters(saved, engine.scheduler.state_dict()):
            # Megatron's load takes the checkpoint's values: keep this job's (extended) length,
            # which its next save records.
            saved["lr_decay_steps"] = engine.scheduler.lr_decay_steps
        engine.scheduler.load_state_dict(saved)
    engine.step_count = int(info["step_count"])


def load_train_state(ckpt_dir: str | Path, engines: dict[str, "ModelRunner"], restore_rng: bool = True) -> dict:
    """Restore what :func:`save_train_state` wrote into freshly built ``engines`` (same roles,
    same layout) and, unless ``restore_rng`` is False, this rank's RNG states. Collective.

    Returns the ``extra`` dict given to the save. Raises CheckpointError naming the file or the
    layout difference (DamagedCheckpointError when files are missing or unreadable); every
    rank raises: the file-only checks run before any collective, and each role's load is
    agreed on.
    """
    d = Path(ckpt_dir)
    meta = read_train_state_meta(d)
    check_compatible(meta, world_size(), {role: _layout(e) for role, e in engines.items()}, str(d))
    for role, engine in engines.items():
        if engine.scheduler is not None:
            _check_scheduler(meta["roles"][role]["scheduler"], engine, role, d)
    extra = _read_json(d / EXTRA_NAME)
    rng_path = rng_file(d, world_rank())
    error: Optional[Exception] = None
    rng_state = None
    if restore_rng:
        try:
            if not rng_path.is_file():
                raise DamagedCheckpointError(f"{rng_path}: missing (RNG state of rank {world_rank()})")
            try:
                rng_state = torch.load(rng_path, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
                raise DamagedCheckpointError(f"{rng_path}: cannot be read ({type(e).__name__}: {e})") from None
        except CheckpointError as e:
            error = e
    # A per-rank file problem must stop every rank before the collective loads below.
    if not all_ranks_ok(error is None):
        raise error or DamagedCheckpointError(f"{d}: the RNG state file of another rank is missing or unreadable")

    for role in sorted(engines):
        error = None
        try:
            _load_role(engines[role], role, meta["roles"][role], d)
        except CheckpointError as e:
            error = e
        # one rank's unreadable shard fails every rank, with the same kind of error
        if not all_ranks_ok(error is None):
            raise error or DamagedCheckpointError(f"{d / role}: another rank could not load role {role}'s files")
    if rng_state is not None:
        restore_rng_state(rng_state, rng_path)
    barrier()
    return extra
