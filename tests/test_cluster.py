"""Several hosts and a real Slurm cluster, made on this one machine.

Two "hosts" are network namespaces h1 (10.200.0.1) and h2 (10.200.0.2) joined by a veth pair
(tests/cluster/netns_up.sh). On them:

- a 2-node torchrun job (static and c10d rendezvous) with the pipeline split across the hosts;
- a Slurm cluster from Debian's packages (tests/cluster/slurm_up.sh): munged, slurmctld and
  slurmd node1 in h1, slurmd node2 in h2; every script in launch/slurm/ is submitted with sbatch;
- a job whose rank is SIGKILLed must end FAILED with an error in its log, within a bound.

Every run's output file must equal, byte for byte, a single-process run of the same command.
The tests need root, `ip netns` and (for Slurm) apt-get; where they cannot run they are skipped
with the reason. Daemons are stopped by PID and the namespaces removed in fixture teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "cluster"
SBATCH_SCRIPTS = sorted(p.name for p in (REPO / "launch" / "slurm").glob("*.sbatch"))
HOST_ADDR = {"h1": "10.200.0.1", "h2": "10.200.0.2"}
MAX_TOKENS = 24
# One thread per rank: this machine has 2 cores for up to 4 processes, and oversubscribed torch
# threads spin (a 16-prompt run took 24 s instead of 2 s). Same for the reference run.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SLURM_UNAVAILABLE = 3  # slurm_up.sh's exit status when apt-get cannot install the packages
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

pytestmark = pytest.mark.cluster


def _run(cmd: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def _shown(p: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(map(str, p.args))}\n[exit {p.returncode}]\n{p.stdout}\n{p.stderr}"


def _why_no_namespaces() -> str | None:
    """A specific reason why network-namespace hosts cannot be made here, or None."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root to make network namespaces and run Slurm daemons (.ci/run runs it as root)"
    for tool in ("ip", "nsenter", "timeout"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is missing (iproute2 / util-linux / coreutils)"
    probe = f"mp-probe-{os.getpid()}"
    made = _run(["ip", "netns", "add", probe], timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip() or made.stdout.strip()}"
    _run(["ip", "netns", "delete", probe], timeout=30)
    return None


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hosts() -> Iterator[None]:
    """Namespaces h1 and h2; removed (with anything left running in them) at the end."""
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(reason)
    try:
        # A fresh start: whatever an earlier, crashed run left in h1/h2 (a Slurm cluster) goes first.
        for script in ("netns_down.sh", "netns_up.sh"):
            p = _run([str(CLUSTER / script)], timeout=60)
            assert p.returncode == 0, _shown(p)
        yield
    finally:
        down = _run([str(CLUSTER / "netns_down.sh")], timeout=60)
        assert down.returncode == 0, _shown(down)


@dataclass(frozen=True)
class TinyModel:
    model_dir: Path
    prompts: Path
    reference: bytes  # output file of the single-process run
    work: Path


def _generate_args(model: TinyModel, output: Path, ranks: int, max_tokens: int = MAX_TOKENS) -> list[str]:
    return [
        "generate", str(model.model_dir), "--input", str(model.prompts), "--output", str(output),
        "--max_tokens", str(max_tokens), "--num_pipeline_ranks", str(ranks), "--dist_timeout", "60",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A random tiny checkpoint, a few prompts, and the single-process run's output."""
    work = tmp_path_factory.mktemp("cluster")
    model_dir = work / "tiny"
    made = _run(
        [sys.executable, "-m", "launch", "make-checkpoint", "--config", "configs/tiny.json", str(model_dir)],
        timeout=120, cwd=REPO,
    )  # fmt: skip
    assert made.returncode == 0, _shown(made)
    prompts = work / "prompts.jsonl"
    lines = [
        {"prompt": "Once upon a time"},
        {"prompt": "The two hosts talk over a veth pair"},
        {"tokens": [1, 415, 293, 96, 7]},
        {"prompt": "Slurm"},
    ]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = TinyModel(model_dir, prompts, b"", work)
    out = work / "reference.jsonl"
    ref = _run(
        [sys.executable, "-m", "launch", *_generate_args(model, out, 1)],
        timeout=120, cwd=REPO, env={**os.environ, **ONE_THREAD},
    )  # fmt: skip
    assert ref.returncode == 0, _shown(ref)
    reference = out.read_bytes()
    assert reference.count(b"\n") == len(lines) and b'"tokens": [' in reference, reference
    return TinyModel(model_dir, prompts, reference, work)


@dataclass(frozen=True)
class SlurmCluster:
    state: Path

    def cmd(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A Slurm client command, run in the controller's namespace with this cluster's SLURM_CONF."""
        return _run([str(CLUSTER / "slurm_cmd.sh"), str(self.state), *args], timeout=timeout, cwd=REPO)

    def submit(self, script: str, log: Path, **env: str) -> int:
        exports = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
        # --time: Slurm's own bound on the job, behind the test's deadline.
        p = self.cmd(
            "sbatch", "--parsable", "--time=4", f"--output={log}", f"--export={exports}",
            f"launch/slurm/{script}",
        )  # fmt: skip
        assert p.returncode == 0, _shown(p)
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        p = self.cmd("scontrol", "show", "job", "-o", str(job_id))
        assert p.returncode == 0, _shown(p)
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def wait(self, job_id: int, log: Path, timeout: float) -> dict[str, str]:
        """Wait for the job to end; cancel it and fail if it has not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in ENDED:
                return info
            time.sleep(0.5)
        self.cmd("scancel", str(job_id))
        pytest.fail(f"job {job_id} still {info['JobState']} after {timeout:.0f}s (cancelled):\n{_read(log)}")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} was not written)"


@pytest.fixture(scope="module")
def slurm(hosts: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One test Slurm cluster for the whole module; daemons stopped by PID at the end."""
    state = tmp_path_factory.mktemp("slurm")
    try:
        up = _run([str(CLUSTER / "slurm_up.sh"), str(state)], timeout=300)
        if up.returncode == SLURM_UNAVAILABLE:
            pytest.skip(f"Slurm is not installed and apt-get could not install it: {up.stderr.strip()[-300:]}")
        assert up.returncode == 0, _shown(up)
        yield SlurmCluster(state)
    finally:
        down = _run([str(CLUSTER / "slurm_down.sh"), str(state)], timeout=120)
        assert down.returncode == 0, _shown(down)


# --- several hosts with torchrun ---------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_two_hosts(hosts: None, tiny_model: TinyModel, rendezvous: str) -> None:
    """One torchrun per host, one rank each: stage 0 in h1, stage 1 in h2."""
    out = tiny_model.work / f"torchrun-{rendezvous}.jsonl"
    port = {"static": "29531", "c10d": "29532"}[rendezvous]
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    try:
        for node_rank, ns in enumerate(["h1", "h2"]):
            if rendezvous == "static":
                rdzv = ["--node-rank", str(node_rank), "--master-addr", HOST_ADDR["h1"], "--master-port", port]
            else:
                rdzv = [
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{HOST_ADDR['h1']}:{port}",
                    "--rdzv-id", f"test-{os.getpid()}", "--rdzv-conf", f"is_host={int(node_rank == 0)}",
                    "--local-addr", HOST_ADDR[ns],
                ]  # fmt: skip
            cmd = [
                "timeout", "-k", "5", "120", "nsenter", f"--net=/run/netns/{ns}",
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--max-restarts", "0", *rdzv, "-m", "launch", *_generate_args(tiny_model, out, 2),
            ]  # fmt: skip
            env = {**os.environ, **ONE_THREAD, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(REPO)}
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append((ns, proc))
        logs = {ns: p.communicate(timeout=150)[0] for ns, p in procs}
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    shown = "\n".join(f"--- {ns} (exit {p.returncode}) ---\n{logs[ns]}" for ns, p in procs)
    assert all(p.returncode == 0 for _, p in procs), shown
    assert "2 stage(s)" in logs["h1"], shown
    assert out.read_bytes() == tiny_model.reference, shown


# --- Slurm -------------------------------------------------------------------------------------


def _job_env(tiny_model: TinyModel, output: Path, **more: str) -> dict[str, str]:
    return {
        "MODEL_DIR": str(tiny_model.model_dir),
        "INPUT": str(tiny_model.prompts),
        "OUTPUT": str(output),
        "MAX_TOKENS": str(MAX_TOKENS),
        "PYTHON": sys.executable,
        "REPO_DIR": str(REPO),
        "GLOO_SOCKET_IFNAME": "eth0",  # the host name maps to 127.0.0.1 in the namespaces
        **ONE_THREAD,
        **more,
    }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("script", SBATCH_SCRIPTS)
def test_sbatch_script(slurm: SlurmCluster, tiny_model: TinyModel, script: str) -> None:
    """Each launch/slurm/*.sbatch, unedited, runs to COMPLETED with the single-process output."""
    out = tiny_model.work / f"{script}.jsonl"
    log = tiny_model.work / f"{script}.log"
    job_id = slurm.submit(script, log, **_job_env(tiny_model, out, EXTRA_ARGS="--dist_timeout 60"))
    info = slurm.wait(job_id, log, timeout=150)
    text = _read(log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "stage(s)" in text and f"job {job_id}: wrote {out}" in text, text
    assert out.read_bytes() == tiny_model.reference, text
    if script.startswith("multi_node"):
        assert info["NodeList"] == "node[1-2]", info


def _rank_pids(ns: str, marker: str) -> list[int]:
    """PIDs in namespace `ns` of engine ranks (python -m launch ..., not torchrun or bash) of one job."""
    listed = _run(["ip", "netns", "pids", ns], timeout=10).stdout.split()
    pids = []
    for pid in map(int, listed):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        is_rank = any(a == "-m" and b == "launch" for a, b in zip(argv, argv[1:], strict=False))
        if is_rank and marker in argv and "torch.distributed.run" not in argv:
            pids.append(pid)
    return pids


@pytest.mark.timeout(240)
@pytest.mark.parametrize("script", SBATCH_SCRIPTS)
def test_killed_rank_fails_job(slurm: SlurmCluster, tiny_model: TinyModel, script: str) -> None:
    """SIGKILL one rank mid-generation: the job ends FAILED, with an error, and leaves no rank."""
    marker = str(tiny_model.work / f"killed-{script}-{uuid.uuid4().hex[:8]}.jsonl")  # unique output path
    log = tiny_model.work / f"killed-{script}.log"
    # Long enough to be still generating when killed: many prompts, many tokens each.
    long_prompts = tiny_model.work / "long.jsonl"
    long_lines = [{"tokens": [1] + [(i * 37 + j * 11) % 500 + 3 for j in range(8)]} for i in range(512)]
    long_prompts.write_text("".join(json.dumps(x) + "\n" for x in long_lines))
    env = _job_env(tiny_model, Path(marker), INPUT=str(long_prompts), MAX_TOKENS="2000",
                   EXTRA_ARGS="--dist_timeout 30")  # fmt: skip
    job_id = slurm.submit(script, log, **env)
    victim_ns = "h1" if script == "one_node.sbatch" else "h2"  # the rank on the second node when there is one

    deadline = time.monotonic() + 90
    # Rank 0 logs the stage layout once every rank has joined the process group; loading the tiny
    # stages takes well under a second, so a few seconds later the ranks are generating.
    while "stage(s)" not in _read(log):
        info = slurm.job(job_id)
        assert info["JobState"] in {"PENDING", "CONFIGURING", "RUNNING"}, f"{info}\n{_read(log)}"
        assert time.monotonic() < deadline, f"job {job_id} did not start:\n{_read(log)}"
        time.sleep(0.25)
    time.sleep(3)
    assert slurm.job(job_id)["JobState"] == "RUNNING", f"job {job_id} ended before the kill:\n{_read(log)}"
    pids = _rank_pids(victim_ns, marker)
    assert pids, f"no rank of job {job_id} found in {victim_ns}:\n{_read(log)}"
    killed_at = time.monotonic()
    os.kill(pids[-1], signal.SIGKILL)

    info = slurm.wait(job_id, log, timeout=90)
    took = time.monotonic() - killed_at
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", f"{info}\n{text}"
    assert f"ERROR: job {job_id}: generation failed" in text, text
    assert re.search(r"task \d+: Killed|Signal 9 \(SIGKILL\)", text), f"the log does not name the killed rank:\n{text}"
    assert not Path(marker).exists(), "a killed job must not write a results file"
    assert took < 60, f"job took {took:.0f}s to fail after the kill:\n{text}"
    # Nothing of the job is left running on either host.
    for _ in range(40):
        left = _rank_pids("h1", marker) + _rank_pids("h2", marker)
        if not left:
            break
        time.sleep(0.25)
    assert not left, f"ranks {left} of job {job_id} still running after it failed:\n{text}"


@pytest.mark.timeout(60)
def test_scripts_pass_shellcheck() -> None:
    """The sbatch scripts and the cluster helpers are clean under shellcheck (when it is installed)."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(CLUSTER.glob("*.sh")) + sorted((REPO / "launch" / "slurm").glob("*.sbatch"))
    p = _run(["shellcheck", "-x", "-s", "bash", *map(str, scripts)], timeout=50, cwd=REPO)
    assert p.returncode == 0, _shown(p)
