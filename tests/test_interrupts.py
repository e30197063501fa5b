"""Interrupted runs (issue 13): a long command stopped by Ctrl-C or killed outright leaves no partial file, and the
same command run again resumes and ends exactly where an uninterrupted run ends.

These start the real command line in a child process and signal it once its first checkpoint is on disk, so that
the stop lands in the middle of the work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reassembly.checkpoint import read_state_dict


def start(*args, cwd: Path) -> subprocess.Popen:
    """The command line in a child process, its output going to files in ``cwd`` (read back by :func:`finish`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REASSEMBLY_CACHE": str(cwd / "cache")}
    env.pop("REASSEMBLY_DEBUG", None)
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "reassembly", *map(str, args)], cwd=cwd, env=env, stdout=out,
                                stderr=err)


def finish(process: subprocess.Popen, cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    process.wait(timeout=timeout)
    return process.returncode, (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()


def run_through(*args, cwd: Path) -> None:
    code, out, err = finish(start(*args, cwd=cwd), cwd)
    assert code == 0, out + err


def stop_when(process: subprocess.Popen, cwd: Path, ready, how: signal.Signals, timeout: float = 300):
    """Send ``how`` to ``process`` as soon as ``ready()`` holds (polled), and collect its exit."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            code, out, err = finish(process, cwd)
            pytest.fail(f"the command ended (exit {code}) before it could be interrupted:\n{out}\n{err}")
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(how)
    return finish(process, cwd)


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes that never finished."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob(".*.tmp")]


def assert_interrupted_cleanly(code: int, err: str, out: Path, how: signal.Signals) -> None:
    """Ctrl-C: exit 130, one line saying what to do, no traceback, no temporary file. A kill cannot be answered;
    what it may leave behind (an atomic write's temporary file) the re-run removes."""
    if how == signal.SIGINT:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 130, err
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("Error: interrupted (Ctrl-C)") and "Run the same command again" in lines[0], err
        assert leftovers(out) == []
    else:
        assert code == -signal.SIGKILL, err


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Path:
    from reassembly.stitch import build_network
    from reassembly.stitch.build import pretrained_block
    from reassembly.stitch.io import save_net

    folder = tmp_path_factory.mktemp("net") / "net"
    save_net(build_network([pretrained_block("resnet20_cifar5", 1, 4)], num_classes=5), folder)
    return folder


def epochs_in_state(run_dir: Path) -> int:
    return len(json.loads(torch.load(run_dir / "state.pt", weights_only=True)["log"]))


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, net, how):
    args = ["train", net, "--data", "digits[0:5]", "--epochs", "3", "--max-per-class", "40", "--batch-size", "8"]
    run_through(*args, "--out", tmp_path / "straight", cwd=tmp_path)
    out = tmp_path / "stopped"
    code, _, err = stop_when(start(*args, "--out", out, cwd=tmp_path), tmp_path, (out / "state.pt").is_file, how)
    assert_interrupted_cleanly(code, err, out, how)
    assert not (out / "final.safetensors").exists() and 1 <= epochs_in_state(out) < 3
    run_through(*args, "--out", out, cwd=tmp_path)
    assert leftovers(out) == []
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    a, _ = read_state_dict(tmp_path / "straight" / "final.safetensors")
    b, _ = read_state_dict(out / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three search processes; the default run checks the in-process resume (tests/test_nas.py)
def test_a_killed_nas_search_resumes_to_the_same_search(tmp_path):
    args = ["nas", "search", "--space", "extend", "--data", "digits", "--epochs", "2", "--cells", "3", "--channels",
            "4", "--subset", "48", "--batch-size", "8", "--threads", "1"]
    run_through(*args, "--out", tmp_path / "straight", cwd=tmp_path)
    out = tmp_path / "stopped"
    code, _, err = stop_when(start(*args, "--out", out, cwd=tmp_path), tmp_path, (out / "state.pt").is_file,
                             signal.SIGKILL)
    assert_interrupted_cleanly(code, err, out, signal.SIGKILL)
    assert not (out / "genotype.json").exists()
    run_through(*args, "--out", out, cwd=tmp_path)
    assert leftovers(out) == []
    a = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    b = torch.load(out / "state.pt", weights_only=True)
    assert all(torch.equal(a["network"][k], b["network"][k]) for k in a["network"])
    for name in ("genotype.json", "alphas.json"):
        assert (out / name).read_text() == (tmp_path / "straight" / name).read_text(), name


@pytest.mark.parametrize("how", [signal.SIGINT, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)],
                         ids=["ctrl-c", "kill"])
def test_interrupted_similarity_resumes_to_the_same_matrices(tmp_path, how):
    import numpy as np

    args = ["similarity", "--zoo", "resnet20_cifar5,resnet20_fashion", "--data", "digits", "--probe-size", "400",
            "--batch-size", "4", "--no-heatmaps", "--checkpoint-seconds", "0"]
    run_through(*args, "--out", tmp_path / "straight", cwd=tmp_path)
    out = tmp_path / "stopped"
    progress = out / "progress" / "rank-0-of-1.npz"
    code, _, err = stop_when(start(*args, "--out", out, cwd=tmp_path), tmp_path, progress.is_file, how)
    assert_interrupted_cleanly(code, err, out, how)
    assert not (out / "similarity.json").exists() and progress.is_file()  # the batches done are kept
    run_through(*args, "--out", out, cwd=tmp_path)
    assert not (out / "progress").exists() and leftovers(out) == []
    names = sorted(p.name for p in (tmp_path / "straight" / "cka").iterdir())
    assert names and names == sorted(p.name for p in (out / "cka").iterdir())
    for name in names:
        with np.load(tmp_path / "straight" / "cka" / name) as a, np.load(out / "cka" / name) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), name


def test_taking_a_run_directory_removes_what_killed_writers_left(tmp_path):
    from reassembly.io import atomic_path, exclusive

    run_dir = tmp_path / "run"
    (run_dir / "progress").mkdir(parents=True)
    with pytest.raises(RuntimeError), atomic_path(run_dir / "state.pt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("a failure inside the block removes its temporary file")
    assert leftovers(run_dir) == []
    stale = [run_dir / ".state.pt.k1l2.tmp", run_dir / "progress" / ".rank-0-of-1.npz.x9.tmp"]  # as a kill leaves them
    for path in stale:
        path.write_text("half")
    (run_dir / "keep.tmp").write_text("not ours")
    with exclusive(run_dir, "trained"):
        assert leftovers(run_dir) == []
    assert (run_dir / "keep.tmp").read_text() == "not ours"


def test_ctrl_c_inside_a_deferred_block_waits_for_its_end():
    from reassembly.io import interrupts_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
        steps.append("after the signal")  # still runs: the state update is finished first
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_deferred_block_keeps_ignoring_ctrl_c_in_a_process_told_to_ignore_it():
    from reassembly.io import interrupts_deferred

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
