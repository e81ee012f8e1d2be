"""A dead peer, SIGINT, or an error seen by one rank ends every rank with a clear message, never a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from common import CONFIGS, write_model
from launchers import slurm_style, torchrun

WORKER = "tests/pipeline_worker.py"
PROMPTS = json.dumps([[1, 5, 6, 7], [1, 8, 9]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults")
    write_model(path, CONFIGS["dense"])
    return path


def wait_for_pids(out: Path, n: int, deadline: float = 60) -> list[int]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        files = [out.with_suffix(f".pid{r}") for r in range(n)]
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.2)
    raise AssertionError("the ranks did not start")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def kill_when_generating(procs_out: Path, n: int, victim: int) -> list[int]:
    pids = wait_for_pids(procs_out, n)
    time.sleep(3)  # loaded and well into generation (the worker generates until killed)
    os.kill(pids[victim], signal.SIGKILL)
    return pids


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [0, 1, 2])
def test_kill9_plain_processes_every_survivor_exits_naming_the_peer(model_dir: Path, tmp_path: Path,
                                                                    victim: int) -> None:
    out = tmp_path / "out.json"
    args = [WORKER, str(model_dir), "--out", str(out), "--prompts", PROMPTS, "--forever", "--timeout", "30"]
    procs = slurm_style(3, [args] * 3)
    try:
        kill_when_generating(out, 3, victim)
        t0 = time.monotonic()
        for r, p in enumerate(procs):
            _, err = p.communicate(timeout=60)
            if r == victim:
                continue
            assert p.returncode != 0, f"rank {r} exited 0 after rank {victim} died"
            assert "lost contact with rank" in err, err[-2000:]
            assert "Traceback" not in err, err[-2000:]
        assert time.monotonic() - t0 < 60
    finally:
        for p in procs:
            p.kill()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [0, 2])
def test_kill9_under_torchrun_ends_the_job(model_dir: Path, tmp_path: Path, victim: int) -> None:
    out = tmp_path / "out.json"
    proc = torchrun(3, [WORKER, str(model_dir), "--out", str(out), "--prompts", PROMPTS, "--forever"])
    try:
        pids = kill_when_generating(out, 3, victim)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert time.monotonic() - t0 < 60
        # torchrun names the rank that died; survivors that noticed first name their lost peer.
        assert f"rank        : {victim}" in err or f"rank {victim}" in err, err[-3000:]
        time.sleep(1)
        assert not any(alive(p) for p in pids), "a rank outlived the job"
    finally:
        proc.kill()


@pytest.mark.timeout(120)
def test_sigint_to_torchrun_ends_every_rank(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = torchrun(2, [WORKER, str(model_dir), "--out", str(out), "--prompts", PROMPTS, "--forever"])
    try:
        pids = wait_for_pids(out, 2)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
        end = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids), "a rank survived SIGINT to the launcher"
    finally:
        proc.kill()


@pytest.mark.timeout(120)
def test_error_on_one_rank_ends_all_ranks_with_that_error(model_dir: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"tokens": [1, 5, 6]}) + "\n")
    missing = tmp_path / "not-here"

    def cmd(d: Path) -> list[str]:
        return ["-m", "launch", "generate", str(d), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                "--num_pipeline_ranks", "2", "--dist_timeout", "30"]

    procs = slurm_style(2, [cmd(model_dir), cmd(missing)])  # only rank 1 lacks its checkpoint
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=90)
        errs.append(err)
        assert p.returncode == 2, err[-2000:]
        assert "Traceback" not in err
    assert "rank 1:" in errs[0] and "not-here" in errs[0]
    assert "not-here" in errs[1]
    assert not (tmp_path / "o.jsonl").exists()


def test_world_size_mismatch_is_a_clear_error() -> None:
    r = subprocess.run([sys.executable, "-m", "launch", "demo", "--num_pipeline_ranks", "2"], capture_output=True,
                       text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "torchrun --nproc-per-node 2" in r.stderr and "Traceback" not in r.stderr
