"""benchmarks/te_setup: bash syntax, the split -> stash -> reassemble round trip on a small fake
core wheel (checksums by hashlib, piece sizes against the limit), idempotence, refusal of missing
or corrupt pieces, and install_on_gpu.sh's layout with a stand-in pip (the torch extension must
land in SITE/transformer_engine/wheel_lib, where TE 2.x's loader searches a PyPI install).

The real download (~285 MB from PyPI) runs only with RLMT_TEST_FETCH_WHEELS=1.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "benchmarks" / "te_setup"
SCRIPTS = ["fetch_wheels.sh", "stash_piece.sh", "install_on_gpu.sh"]
CORE = "transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl"
PIECE = 1 << 20  # 1 MiB pieces in the tests (56 MiB for real)


def sh(script: str, *args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SETUP / script), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(SETUP / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def split_fake_wheel(dest: Path, payload: bytes) -> Path:
    """fetch_wheels.sh on a core wheel that is already there: no network, only the split."""
    (dest / "full").mkdir(parents=True)
    wheel = dest / "full" / CORE
    wheel.write_bytes(payload)
    sh("fetch_wheels.sh", dest, env={"TE_FETCH_ONLY": "te", "TE_PIECE_BYTES": str(PIECE), "PYTHON": "false"})
    return wheel


def test_split_stash_reassemble_round_trip(tmp_path):
    payload = os.urandom(3 * PIECE + 12345)
    wheel = split_fake_wheel(tmp_path / "whl", payload)
    te = tmp_path / "whl" / "te"
    parts = sorted(te.glob("part-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in parts] == ["part-1", "part-2", "part-3", "part-4"]  # ceil(3.01 MiB / 1 MiB)
    expected = f"{hashlib.sha256(payload).hexdigest()}  {CORE}\n"
    assert (te / "SHA256SUMS").read_text() == expected
    for p in parts:
        (piece,) = p.glob("*.part-*")
        assert piece.stat().st_size <= PIECE
        assert (p / "SHA256SUMS").read_text() == expected and (p / "PARTS").read_text().strip() == "4"
    assert b"".join((next(p.glob("*.part-*"))).read_bytes() for p in parts) == payload

    stash, work = tmp_path / "stash", tmp_path / "work"
    env = {"TE_PIECES": str(stash), "TE_WORK": str(work), "TE_SKIP_BUILD": "1"}
    for p in reversed(parts):  # arrival order does not matter
        sh("stash_piece.sh", p, env=env)
    sh("install_on_gpu.sh", env=env)
    assert (work / CORE).read_bytes() == payload
    assert sha256(work / CORE) == sha256(wheel)


def test_missing_and_corrupt_pieces_are_refused(tmp_path):
    split_fake_wheel(tmp_path / "whl", os.urandom(2 * PIECE + 1))
    te = tmp_path / "whl" / "te"
    stash, work = tmp_path / "stash", tmp_path / "work"
    env = {"TE_PIECES": str(stash), "TE_WORK": str(work), "TE_SKIP_BUILD": "1"}
    sh("stash_piece.sh", te / "part-1", env=env)
    sh("stash_piece.sh", te / "part-3", env=env)
    proc = sh("install_on_gpu.sh", env=env, check=False)
    assert proc.returncode != 0 and "lacks part-2 of 3 pieces" in proc.stderr

    sh("stash_piece.sh", te / "part-2", env=env)
    piece = stash / f"{CORE}.part-01"
    data = bytearray(piece.read_bytes())
    data[100] ^= 0xFF
    piece.write_bytes(bytes(data))
    proc = sh("install_on_gpu.sh", env=env, check=False)
    assert proc.returncode != 0 and "expected" in proc.stderr and "sha256" in proc.stderr
    assert not (work / CORE).exists()

    proc = sh("stash_piece.sh", tmp_path / "nowhere", env=env, check=False)
    assert proc.returncode != 0 and "not a folder" in proc.stderr


def test_stash_drops_pieces_of_another_wheel(tmp_path):
    env = {"TE_PIECES": str(tmp_path / "stash")}
    split_fake_wheel(tmp_path / "old", os.urandom(PIECE + 1))
    sh("stash_piece.sh", tmp_path / "old" / "te" / "part-1", env=env)
    split_fake_wheel(tmp_path / "new", os.urandom(PIECE + 2))
    out = sh("stash_piece.sh", tmp_path / "new" / "te" / "part-2", env=env).stdout
    assert "(1 of 2 pieces there)" in out
    assert (tmp_path / "stash" / "SHA256SUMS").read_text() == (tmp_path / "new" / "te" / "SHA256SUMS").read_text()


def test_fetch_is_idempotent(tmp_path):
    dest = tmp_path / "whl"
    split_fake_wheel(dest, os.urandom(2 * PIECE + 7))
    base = dest / "base"
    for name in ["transformer_engine-2.20.2-py3-none-any.whl", "megatron_core-0.19.2-cp312-cp312-x.whl",
                 "pydantic-2.14.3-py3-none-any.whl", "pydantic_core-2.50.4-cp312-cp312-x.whl",
                 "annotated_types-0.8.0-py3-none-any.whl", "typing_inspection-0.4.5-py3-none-any.whl",
                 "transformer_engine_torch-2.20.2.tar.gz"]:
        (base / name).write_bytes(b"x")
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}
    # PYTHON=false: any download attempt (pip or the sdist fetch) would fail the script.
    proc = sh("fetch_wheels.sh", dest, env={"TE_PIECE_BYTES": str(PIECE), "PYTHON": "false"})
    assert "have 3 pieces" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == before

    # A smaller piece limit than the pieces there: cut again, every piece within the new limit.
    sh("fetch_wheels.sh", dest, env={"TE_PIECE_BYTES": str(PIECE // 2), "PYTHON": "false"})
    pieces = list((dest / "te").glob("part-*/*.part-*"))
    assert len(pieces) == 5 and all(p.stat().st_size <= PIECE // 2 for p in pieces)


FAKE_PYTHON = textwrap.dedent('''\
    #!{python}
    """Stands in for the GPU machine's python3: `-m pip install` is simulated (wheels are
    unzipped, the sdist "builds" to what the TE build makes), anything else runs for real."""
    import json, os, sys, zipfile
    from pathlib import Path

    args = sys.argv[1:]
    if args[:3] == ["-m", "pip", "install"]:
        target = Path(args[args.index("--target") + 1])
        env = {{k: os.environ.get(k) for k in ("NVTE_CUDA_ARCHS", "MAX_JOBS", "NVTE_FRAMEWORK", "PYTHONPATH")}}
        with open(os.environ["FAKE_PIP_LOG"], "a") as log:
            log.write(json.dumps({{"args": args, "env": env}}) + "\\n")
        for item in args[3:]:
            if item.endswith(".whl"):
                zipfile.ZipFile(item).extractall(target)
            elif item.endswith(".tar.gz"):
                lib = target / "transformer_engine" / "wheel_lib"
                lib.mkdir(parents=True)
                (lib / "transformer_engine_torch.cpython-312-x86_64-linux-gnu.so").write_bytes(b"so")
                (target / "transformer_engine_torch-2.20.2.dist-info").mkdir()
            elif Path(item).is_dir() and item != str(target):
                (target / "rlmt_megatron_installed").write_text(item)
        sys.exit(0)
    os.execv({python!r}, [{python!r}, *args])
''')

FAKE_TE_PYTORCH = textwrap.dedent('''\
    from pathlib import Path
    if not list((Path(__file__).parent.parent / "wheel_lib").glob("transformer_engine_torch*.so")):
        raise ImportError("no transformer_engine_torch extension in transformer_engine/wheel_lib")
    def is_fp8_available(return_reason=False):
        return (False, "fake TE") if return_reason else False
''')


def test_install_puts_the_extension_where_te_loads_it(tmp_path):
    dest = tmp_path / "whl"
    (dest / "full").mkdir(parents=True)
    with zipfile.ZipFile(dest / "full" / CORE, "w") as z:  # a core wheel whose pytorch part needs the extension
        z.writestr("transformer_engine/__init__.py", "__version__ = '2.20.2'\n")
        z.writestr("transformer_engine/pytorch/__init__.py", FAKE_TE_PYTORCH)
        z.writestr("transformer_engine_cu13-2.20.2.dist-info/METADATA", "Name: transformer-engine-cu13\n")
    sh("fetch_wheels.sh", dest, env={"TE_FETCH_ONLY": "te", "TE_PIECE_BYTES": "300", "PYTHON": "false"})
    (dest / "base").mkdir(exist_ok=True)  # fetch_wheels.sh made it
    with zipfile.ZipFile(dest / "base" / "pydantic-2.14.3-py3-none-any.whl", "w") as z:
        z.writestr("fake_pydantic_marker.py", "")
    (dest / "base" / "transformer_engine_torch-2.20.2.tar.gz").write_bytes(b"sdist")
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    site, stash, log = tmp_path / "site", tmp_path / "stash", tmp_path / "pip.jsonl"
    env = {"TE_PIECES": str(stash), "TE_WORK": str(tmp_path / "work"), "TE_SITE": str(site), "PYTHON": str(fake),
           "FAKE_PIP_LOG": str(log), "PYTHONPATH": ""}
    for part in sorted((dest / "te").glob("part-*")):
        sh("stash_piece.sh", part, env=env)

    proc = sh("install_on_gpu.sh", dest / "base", env=env)
    assert proc.stdout.strip().splitlines()[-1] == f"export PYTHONPATH={site}"
    assert "transformer_engine 2.20.2" in proc.stderr and "FP8 unavailable: fake TE" in proc.stderr
    assert (site / "transformer_engine" / "wheel_lib" / "transformer_engine_torch.cpython-312-x86_64-linux-gnu.so").is_file()
    assert (site / "transformer_engine" / "pytorch" / "__init__.py").is_file()  # the core wheel's files stay
    assert (site / "transformer_engine_torch-2.20.2.dist-info").is_dir()
    assert (site / "fake_pydantic_marker.py").is_file()
    assert (site / "rlmt_megatron_installed").read_text() == str(REPO)

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    build = next(c for c in calls if any(a.endswith(".tar.gz") for a in c["args"]))
    assert {"--no-index", "--no-build-isolation", "--no-deps"} <= set(build["args"])
    assert build["env"]["NVTE_CUDA_ARCHS"] == "90" and build["env"]["MAX_JOBS"] == "16"
    assert build["env"]["NVTE_FRAMEWORK"] == "pytorch" and build["env"]["PYTHONPATH"] == str(site)
    assert str(site) not in build["args"]  # built into its own folder, then merged
    wheels = next(c for c in calls if any(a.endswith(CORE) for a in c["args"]))
    assert {"--no-index", "--no-deps"} <= set(wheels["args"])

    # Second run on the warm machine: TE imports, so no reinstall or rebuild; the repo is reinstalled.
    proc = sh("install_on_gpu.sh", tmp_path / "absent", env=env)
    assert "already imports" in proc.stderr
    calls_after = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls_after) == len(calls) + 1 and str(REPO) in calls_after[-1]["args"]


@pytest.mark.skipif(os.environ.get("RLMT_TEST_FETCH_WHEELS") != "1",
                    reason="downloads ~285 MB from PyPI; set RLMT_TEST_FETCH_WHEELS=1")
def test_real_fetch(tmp_path):
    sh("fetch_wheels.sh", tmp_path, env={"PYTHON": sys.executable})
    te = tmp_path / "te"
    parts = list(te.glob("part-*"))
    assert 4 <= len(parts) <= 6
    assert all(next(p.glob("*.part-*")).stat().st_size <= 56 * 2**20 for p in parts)
    (wheel,) = (tmp_path / "full").glob("transformer_engine_cu13-2.20.2-*.whl")
    assert f"{sha256(wheel)}  {wheel.name}\n" == (te / "SHA256SUMS").read_text()
    assert zipfile.is_zipfile(wheel)
    names = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert any(n.startswith("megatron_core-0.19.2-cp312") for n in names)
    assert "transformer_engine_torch-2.20.2.tar.gz" in names
    assert sum(p.stat().st_size for p in (tmp_path / "base").iterdir()) < 32 * 2**20
    again = sh("fetch_wheels.sh", tmp_path, env={"PYTHON": sys.executable}).stderr
    assert "downloading" not in again and f"have {len(parts)} pieces" in again
