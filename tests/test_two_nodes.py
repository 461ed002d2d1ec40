"""Two nodes for real: two network namespaces on this machine, joined by a veth pair, each running
its own torchrun (``--nnodes 2``, one rank per node, a data-parallel replica each), and a tiny
asynchronous GRPO run with two hf engines in their own processes, split over the nodes: engine i
is built, synced and driven by node i's rank, which gets the weights from its own replica
(``trainer/engine_hosts.py``, ``hf_export.buckets_for``); each sync is checksummed on each
engine. In the two-node run one engine process kills itself in its first generation
(``tests/workers/faulty_engines.py``, ``die@0``): its prompt finishes on the engine of the other
node, and its own node's rank restarts and re-syncs it. The reference is the same config run on
one node without the fault (two ranks there, both engines on rank 0): the metrics (but restart
counts and per-engine figures) and the final weights must be equal bit for bit, so nothing in
the loop depends on where its ranks or engines live, nor on an engine lost on another node.

The namespaces, the veth pair and the addresses are made by the fixture, named after this
process, and deleted afterwards (root can do this inside the sandbox; nothing outside it is
touched). gloo is told which interface to use (``GLOO_SOCKET_IFNAME``): in a namespace, the
machine's hostname resolves to an address that namespace does not have.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, free_port, read_metrics, torchrun, write_train_config


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two namespaces with one veth end each: (namespace, interface, address) per node."""
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    hosts = [(f"rlmt{tag}n{i}", f"rlmt{tag}v{i}", f"{subnet}.{i + 1}") for i in range(2)]
    try:
        for ns, _, _ in hosts:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, addr in hosts:
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        yield hosts
    finally:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_engines_split_over_two_nodes_give_the_same_run_as_on_one_even_when_one_dies(tiny_models, tmp_path, two_hosts):
    sections = dict(run={"total_steps": 3}, optim={"lr": 1e-2},
                    rollout={"samples_per_prompt": 3, "max_new_tokens": 8, "temperature": 1.0, "engines": 2,
                             "engine_process": "subprocess", "max_staleness": 1},
                    algorithm={"kl_coef": 0.01, "entropy_coef": 0.001, "rollout_correction": {"mode": "tis"}})
    one = write_train_config(tmp_path / "one.yaml", tiny_models, tmp_path / "one", **sections)
    two = write_train_config(tmp_path / "two.yaml", tiny_models, tmp_path / "two", **sections)
    single = torchrun(2, ["-m", "rlmt_megatron.cli.train", str(one)], timeout=600)

    master, port = two_hosts[0][2], str(free_port())
    faults = tmp_path / "faults"
    faults.mkdir()
    procs = []
    for rank, (ns, dev, _) in enumerate(two_hosts):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": dev,
               "RLMT_FAULT": "die@0", "RLMT_FAULT_DIR": str(faults)}
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr", master, "--master-port", port,
               "tests/workers/fault_inject_worker.py", str(two)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    # where the engines live: both on the one node's rank 0; one per node, each on its node's rank
    assert "rollout engines: engine 0 on node 0 (rank 0); engine 1 on node 0 (rank 0)" in single.stdout
    assert "rollout engines: engine 0 on node 0 (rank 0); engine 1 on node 1 (rank 1)" in outputs[0]
    died = re.search(r"rollout engine (\d) failed: hf engine process died \(exit code -9\) while generating", outputs[0])
    assert died, outputs[0][-3000:]
    dead = int(died.group(1))
    assert f"restarting rollout engine {dead} (1/3 in a row, 1 in this run)" in outputs[0]
    drop = ("timing/", "engines/", "memory/", "rollout/restarts")
    rows = read_metrics(tmp_path / "two", drop)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows == read_metrics(tmp_path / "one", drop)
    assert [r["rollout/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]  # asynchronous, one update behind
    # step 1: both prompts served by the engine of the other node; then one each, as on one node
    shares = [[r[f"engines/{i}/prompts"] for i in (0, 1)] for r in read_metrics(tmp_path / "two")]
    assert shares[0][dead] == 0 and shares[0][1 - dead] == 2 and shares[1:] == [[1, 1]] * 2
    assert [[r[f"engines/{i}/prompts"] for i in (0, 1)] for r in read_metrics(tmp_path / "one")] == [[1, 1]] * 3
    assert [r["rollout/restarts"] for r in read_metrics(tmp_path / "two")] == [1, 1, 1]
    a, b = (load_file(str(tmp_path / name / "final_hf" / "model.safetensors")) for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
