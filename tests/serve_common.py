"""Start and stop `python -m launch serve` for the tests: 127.0.0.1, a free port, bounded waits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from launchers import REPO, base_env, free_port


class ServerProcess:
    def __init__(self, model: Path, flags: list[str], nproc: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["-m", "launch", "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                "--num_pipeline_ranks", str(nproc), "--threads", "1", *flags]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(free_port()), *args]
        else:
            cmd = [sys.executable, *args]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-test-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the whole job: torchrun and its ranks
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def offline(model: Path, lines: list[dict[str, object]], tmp: Path, flags: list[str]) -> list[dict[str, object]]:
    """`python -m launch generate` on the same model: the reference the server must equal."""
    src, dst = tmp / "in.jsonl", tmp / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = subprocess.run([sys.executable, "-m", "launch", "generate", str(model), "--input", str(src), "--output",
                        str(dst), "--threads", "1", *flags], cwd=REPO, env=base_env(), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in dst.read_text().splitlines()]
