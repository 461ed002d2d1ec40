"""Fault handling in rlmt-train, piece by piece: stop signals (SLURM preemption), a failing
weight push, collective timeouts, impossible engine choices and the watchdog.

The end-to-end runs under each fault (kills, stop signals, engine deaths and hangs, a full disk,
a damaged checkpoint, two runs on one folder) are the campaign in test_fault_campaign.py.
"""

import json
import os
import signal
import threading
import time

import pytest
import torch

from helpers import torchrun
from rlmt_megatron.rollout.engine import EngineError
from rlmt_megatron.config.rlmt import RLMTConfig
from rlmt_megatron.rollout.weight_sync.pipeline import SyncPipeline, SyncTarget
from rlmt_megatron.trainer.stop import Interrupted, StopSignals
from rlmt_megatron.trainer.watchdog import Watchdog, activity



def _wait_until(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


# ---------------------------------------------------------------------------------------------
# Units


def test_stop_signal_sets_a_flag_and_interrupts_only_the_engine_wait():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(["SIGTERM"]) as stop:
        # while rank 0 waits for the engine: the wait is interrupted
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        with pytest.raises(Interrupted):
            with stop.interruptible():
                _wait_until(lambda: False, 60)
        timer.join()
        assert stop.requested and stop.signal_name == "SIGTERM"
        # a region entered after the request stops at once
        with pytest.raises(Interrupted):
            with stop.interruptible():
                pytest.fail("the body must not run once a stop was requested")
    assert signal.getsignal(signal.SIGTERM) is before

    with StopSignals(["SIGTERM"]) as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # anywhere else: only the flag, the code goes on
        assert _wait_until(lambda: stop.requested, 10)
        assert stop.agreed()  # a world of one agrees with itself
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_failed_weight_push_still_reads_the_whole_export_stream():
    # The export stream is collective: if rank 0 stopped reading it, the other ranks would wait in
    # their gathers forever. The error must still come out.
    read = []

    def stream():
        for i in range(5):
            read.append(i)
            yield [(f"w{i}", torch.zeros(2))]

    class DyingTransport:
        def push(self, buckets, version):
            next(iter(buckets))
            raise EngineError("engine process died while syncing")

    with pytest.raises(EngineError, match="died while syncing"):
        SyncPipeline().push(stream(), 3, {0: SyncTarget(DyingTransport(), None)})
    assert read == [0, 1, 2, 3, 4]


def _config(**sections) -> RLMTConfig:
    tree = {"models": {"policy": "p", "reward": "r"}, "data": {"prompts": ["x.jsonl"]}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return RLMTConfig.model_validate(tree)


def test_collective_timeout_outlasts_the_engine_timeout():
    assert _config().collective_timeout_minutes() == 3600 / 60 + 10  # default rollout.timeout_s: 1 h
    assert _config(rollout={"timeout_s": 60}).collective_timeout_minutes() == 30
    assert _config(run={"collective_timeout_minutes": 90}).collective_timeout_minutes() == 90
    with pytest.raises(ValueError, match="run.collective_timeout_minutes=20 .*rollout.timeout_s=3600"):
        _config(run={"collective_timeout_minutes": 20})  # refused when the config is loaded


def test_engine_process_choices_that_cannot_work_are_refused_at_load():
    with pytest.raises(ValueError, match="engine_process=inline is impossible with the vllm engine"):
        _config(rollout={"engine": "vllm", "engine_process": "inline"})
    with pytest.raises(ValueError, match="sglang engine is its own server"):
        _config(rollout={"engine": "sglang", "sglang_url": "http://h:1", "engine_process": "subprocess"})


def test_watchdog_reports_a_stuck_phase_once_with_its_stack(tmp_path, capfd):
    with Watchdog(0.3, tmp_path / "watchdog", rank=5) as dog:
        with activity("step 7"):
            with activity("quick phase"):
                pass
            with activity("stuck phase"):
                assert _wait_until(lambda: dog.reports >= 1, 30)
                time.sleep(1.0)  # still stuck: no second report for the same phase
    text = (tmp_path / "watchdog" / "rank_5.txt").read_text()
    assert text.count("=== watchdog") == 1
    assert "rank 5" in text and "'step 7 > stuck phase'" in text
    assert "in _wait_until" in text  # the main thread's stack, where it really was
    assert "'step 7 > stuck phase'" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# Collectives (the end-to-end runs under faults are in test_fault_campaign.py)


def test_watchdog_names_what_each_rank_waits_on_and_the_collective_times_out(tmp_path):
    # The collective timeout (8 s) also bounds the rendezvous: short enough to keep the test quick,
    # long enough for two ranks to meet on a loaded 2-core machine (2 s timed out there once).
    torchrun(2, ["tests/workers/watchdog_worker.py", "--out", str(tmp_path), "--timeout-s", "8", "--watchdog-s", "0.5",
                 "--sleep", "12"], timeout=300)
    waiting = (tmp_path / "watchdog" / "rank_0.txt").read_text()
    stuck = (tmp_path / "watchdog" / "rank_1.txt").read_text()
    assert "rank 0" in waiting and "'step 1 > barrier: waiting for rank 1'" in waiting and " in barrier" in waiting
    assert "rank 1" in stuck and "'step 1 > slow work on rank 1'" in stuck and " in _slow_work" in stuck
    # the barrier failed after the configured timeout instead of waiting for rank 1
    error = json.loads((tmp_path / "rank0_result.json").read_text())["error"]
    assert error is not None and "Timed out" in error
