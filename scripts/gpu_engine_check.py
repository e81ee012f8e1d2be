#!/usr/bin/env python3
"""The engine's own commands on a CUDA GPU, each checked against the CPU or the eager path.

    python scripts/gpu_engine_check.py --results checks.jsonl --budget 200
    python scripts/gpu_engine_check.py --report checks.jsonl      # only print the table

Small random models (configs/tiny.json: window 16, so prompts of 40 tokens wrap the rolling
cache; configs/tiny-moe.json) are written with `make-checkpoint`; every check runs
`python -m launch ...` as a user would and compares the tokens it writes:

- generate on CUDA in fp32 (sdpa; xformers; chunk 3 with 2 micro-batches; MoE) == generate on CPU;
- --compile on CUDA == eager on CUDA (fp32 and bf16);
- --quantize int8 / int4 on CUDA: runs, and agreement with the same quantization on CPU;
- serve on CUDA: 4 concurrent clients (greedy completions) == offline generate on CUDA;
- two pipeline ranks over NCCL on the one GPU (scripts/gpu_shared_launch.py maps every local rank
  to cuda:0) == one rank, when NCCL accepts two processes on one device.

A check that fails or runs out of time does not stop the later ones; each one's row (check, ok,
seconds, detail) is appended to --results at once, and the table is printed last. Exit status 1
if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MAX_TOKENS = 24


RESULT = {True: "ok", False: "FAILED", None: "skipped"}


class Skipped(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Checker:
    def __init__(self, work: Path, results: Path, deadline: float) -> None:
        self.work, self.results, self.deadline = work, results, deadline
        self.failed = False
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(
        self, args: list[str], timeout: float = 120, launcher: list[str] | None = None, stdout: Path | None = None
    ) -> str:
        """python -m launch ARGS (or LAUNCHER ARGS); returns stderr; raises with its tail on failure."""
        timeout = min(timeout, self.left() - 5)
        if timeout < 10:
            raise Skipped("skipped: no time left in the budget")
        cmd = [*(launcher or [PY, "-m", "launch"]), *args]
        log("$ " + " ".join(cmd))
        # A session of its own: on a timeout the whole group goes (torchrun and its ranks).
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise TimeoutError(f"killed after {timeout:.0f} s: {err.strip()[-300:]}") from None
        if p.returncode != 0:
            log(f"--- exit {p.returncode}; its stderr:\n{err[-6000:]}\n---")
            lines = (err or out).strip().splitlines()
            said = [line for line in lines if "error" in line.lower() or "Error" in line]
            tail = "\n".join((said or lines)[-4:])
            if "has no kernel" in tail:
                raise Skipped(f"skipped: {tail.splitlines()[-1][:300]}")
            if "Duplicate GPU detected" in err:  # NCCL refuses two ranks on one device
                dup = next(line for line in err.splitlines() if "Duplicate GPU detected" in line)
                raise Skipped(f"skipped: NCCL refuses two ranks on one GPU ({dup.strip()[:200]}); needs 2 GPUs")
            raise RuntimeError(f"exit {p.returncode}: {tail}")
        if stdout is not None:
            stdout.write_text(out)
        return err

    def generate(self, model: Path, name: str, flags: list[str], prompts: Path | None = None) -> list[dict[str, Any]]:
        out = self.work / f"{name}.jsonl"
        out.unlink(missing_ok=True)
        inp = prompts or self.work / "prompts.jsonl"
        self.run(["generate", str(model), "--input", str(inp), "--output", str(out),
                  "--max_tokens", str(MAX_TOKENS), *flags])  # fmt: skip
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]

    def check(self, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        t0 = time.monotonic()
        ok: bool | None
        try:
            ok, detail = fn()
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {str(e).strip()[:400]}"
            if isinstance(e, Skipped):
                ok, detail = None, str(e)  # skipped, not failed
        row = dict(check=name, ok=ok, seconds=round(time.monotonic() - t0, 1), detail=detail)
        self.failed |= ok is False
        log(f"[{RESULT[ok]}] {name} ({row['seconds']} s): {detail}")
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")


def tokens(rows: list[dict[str, Any]]) -> list[list[int]]:
    return [r["tokens"] for r in rows]


def compare(got: list[list[int]], want: list[list[int]]) -> tuple[bool, str]:
    same = sum(a == b for a, b in zip(got, want, strict=True))
    toks = sum(x == y for a, b in zip(got, want, strict=True) for x, y in zip(a, b, strict=False))
    total = sum(len(b) for b in want)
    return same == len(want), f"{same}/{len(want)} sequences identical, {toks}/{total} tokens"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_check(
    c: Checker, model: Path, reference: list[dict[str, Any]], prompts: list[str], device: str
) -> tuple[bool, str]:
    import httpx

    if c.left() < 30:
        raise Skipped("skipped: no time left in the budget")
    port = free_port()
    logf = open(c.work / "serve.log", "w+")  # noqa: SIM115
    cmd = [PY, "-m", "launch", "serve", str(model), "--device", device, "--dtype", "float32", "--attention", "sdpa",
           "--host", "127.0.0.1", "--port", str(port), "--max_batch", "8"]  # fmt: skip
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=c.env, stdout=logf, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + min(90, c.left() - 10)
        while True:
            if proc.poll() is not None:
                logf.seek(0)
                raise RuntimeError(f"server exited {proc.returncode}: {logf.read()[-600:]}")
            try:
                if httpx.get(url + "/health", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready")
            time.sleep(0.3)
        name = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        texts: list[str | None] = [None] * len(prompts)
        errors: list[str] = []

        def client(i: int) -> None:
            try:
                r = httpx.post(url + "/v1/completions", timeout=60, json=dict(
                    model=name, prompt=prompts[i], max_tokens=MAX_TOKENS, temperature=0))  # fmt: skip
                r.raise_for_status()
                texts[i] = r.json()["choices"][0]["text"]
            except Exception as e:
                errors.append(f"client {i}: {type(e).__name__}: {e}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        wall = time.monotonic() - t0
        if errors:
            return False, "; ".join(errors)[:400]
        want = [r["text"] for r in reference]
        same = sum(a == b for a, b in zip(texts, want, strict=True))
        metrics = httpx.get(url + "/metrics", timeout=10).text
        running = [line for line in metrics.splitlines() if line.startswith("mistral_pipeline") and "token" in line]
        return same == len(want), (
            f"{len(prompts)} concurrent clients in {wall:.2f} s: {same}/{len(want)} texts equal to offline generate"
            + (f"; {running[0]}" if running else "")
        )
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="", help="JSON-lines file the rows are appended to")
    ap.add_argument("--budget", type=float, default=240, help="seconds for all checks (later ones are skipped)")
    ap.add_argument("--report", default="", help="only print the table of this results file")
    ap.add_argument("--cpu_dry_run", action="store_true", help="the same steps with 'cuda' read as 'cpu' (plumbing)")
    opts = ap.parse_args()
    if opts.report:
        report(Path(opts.report))
        return
    import torch

    dev = "cpu" if opts.cpu_dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available: this script checks the engine on a GPU")
    work = Path(tempfile.mkdtemp(prefix="gpu-engine-check-"))
    results = Path(opts.results or work / "checks.jsonl")
    c = Checker(work, results, time.monotonic() + opts.budget)
    dense, moe = work / "tiny", work / "tiny-moe"
    c.run(["make-checkpoint", str(dense), "--config", str(ROOT / "configs/tiny.json")])
    c.run(["make-checkpoint", str(moe), "--config", str(ROOT / "configs/tiny-moe.json"), "--seed", "1"])
    texts = ["Once upon a time", "The quick brown fox", "a b c d e f g h i j k l m n o p q r s t u v w x y z",
             "Hello", "In 1492, Columbus", "def f(x): return x"]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = [[1, *torch.randint(3, 512, (n,), generator=g).tolist()] for n in (40, 3)]  # 40 > the window of 16
    lines = [json.dumps({"prompt": t}) for t in texts] + [json.dumps({"tokens": p}) for p in ids]
    (work / "prompts.jsonl").write_text("".join(line + "\n" for line in lines))
    cpu = ["--device", "cpu", "--dtype", "float32"]
    gpu = ["--device", dev, "--dtype", "float32", "--attention", "sdpa"]  # (xformers has a check of its own)
    ref: dict[str, list[dict[str, Any]]] = {}

    def cpu_reference() -> tuple[bool, str]:
        ref["cpu"] = c.generate(dense, "cpu", cpu)
        ref["moe_cpu"] = c.generate(moe, "moe_cpu", cpu)
        return True, f"{len(ref['cpu'])} prompts x {MAX_TOKENS} tokens (dense and MoE)"

    def same_as(name: str, model: Path, flags: list[str], want: str) -> Callable[[], tuple[bool, str]]:
        def fn() -> tuple[bool, str]:
            ref[name] = c.generate(model, name, flags)
            return compare(tokens(ref[name]), tokens(ref[want]))

        return fn

    c.check("reference: generate on CPU, fp32", cpu_reference)
    c.check("generate cuda fp32 sdpa == CPU", same_as("cuda", dense, gpu, "cpu"))

    def nccl_two_ranks() -> tuple[bool, str]:
        out = work / "nccl.jsonl"
        launcher = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                    *([str(ROOT / "scripts/gpu_shared_launch.py")] if dev == "cuda" else ["-m", "launch"])]  # fmt: skip
        err = c.run(["generate", str(dense), "--input", str(work / "prompts.jsonl"), "--output", str(out),
                     "--max_tokens", str(MAX_TOKENS), *gpu, "--num_pipeline_ranks", "2", "--dist_timeout", "60"],
                    timeout=120, launcher=launcher)  # fmt: skip
        got = [json.loads(line)["tokens"] for line in out.read_text().splitlines() if line.strip()]
        ok, detail = compare(got, tokens(ref["cuda"]))
        busy = [line.strip() for line in err.splitlines() if "busy" in line]
        return ok, detail + (f"; {busy[-1][:160]}" if busy else "")

    c.check("2 ranks over NCCL on one GPU == 1 rank", nccl_two_ranks)
    c.check("serve cuda: concurrent clients == generate",
            lambda: serve_check(c, dense, ref["cuda"][: len(texts)], texts, dev))  # fmt: skip
    c.check(
        "generate cuda fp32 xformers == CPU", same_as("cuda_xf", dense, [*gpu[:-2], "--attention", "xformers"], "cpu")
    )
    c.check("generate cuda fp32 chunk 3, M=2 == CPU",
            same_as("cuda_chunk", dense, [*gpu, "--chunk_size", "3", "--num_microbatches", "2"], "cpu"))  # fmt: skip
    c.check("generate cuda fp32 MoE == CPU", same_as("moe_cuda", moe, gpu, "moe_cpu"))
    for mode in ("int8", "int4"):

        def quant(mode: str = mode) -> tuple[bool, str]:
            on_cpu = c.generate(dense, f"{mode}_cpu", [*cpu, "--quantize", mode])
            on_gpu = c.generate(dense, f"{mode}_cuda", [*gpu, "--quantize", mode])
            ok = [len(r["tokens"]) for r in on_gpu] == [len(r["tokens"]) for r in on_cpu]
            return ok, (f"ran; vs {mode} on CPU: {compare(tokens(on_gpu), tokens(on_cpu))[1]}; "
                        f"vs fp32: {compare(tokens(on_gpu), tokens(ref['cuda']))[1]}")  # fmt: skip

        c.check(f"--quantize {mode} cuda (fp32 activations)", quant)

    def perplexity() -> tuple[bool, str]:
        text = ROOT / "tests/data/declaration-of-independence.txt"
        flags = ["--input", str(text), "--context", "64", "--max_windows", "6", "--json"]
        got = {}
        for where, dev_flags in (("cpu", cpu), ("cuda", gpu)):
            out = work / f"ppl_{where}.json"
            c.run(["perplexity", str(dense), *flags, *dev_flags], timeout=60, stdout=out)
            got[where] = json.loads(out.read_text().strip().splitlines()[-1])["perplexity"]
        rel = abs(got["cuda"] - got["cpu"]) / got["cpu"]
        return rel < 1e-4, f"fp32 perplexity cuda {got['cuda']:.6f}, cpu {got['cpu']:.6f} (relative {rel:.1e})"

    c.check("perplexity cuda fp32 == CPU", perplexity)
    c.check("--compile cuda fp32 == eager cuda", same_as("cuda_compiled", dense, [*gpu, "--compile"], "cuda"))

    def bf16_compile() -> tuple[bool, str]:
        bf = ["--device", dev, "--dtype", "bfloat16", "--attention", "sdpa"]
        ref["cuda_bf16"] = c.generate(dense, "cuda_bf16", bf)
        ok, detail = compare(tokens(c.generate(dense, "cuda_bf16_compiled", [*bf, "--compile"])),
                             tokens(ref["cuda_bf16"]))  # fmt: skip
        return ok, detail + f"; bf16 eager vs fp32: {compare(tokens(ref['cuda_bf16']), tokens(ref['cuda']))[1]}"

    c.check("--compile cuda bf16 == eager cuda bf16", bf16_compile)

    report(results)
    sys.exit(1 if c.failed else 0)


def report(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    print("\nengine checks on CUDA (scripts/gpu_engine_check.py):")
    print("| check | result | s | detail |\n|---|---|---|---|")
    for r in rows:
        detail = str(r["detail"]).replace("|", "/").replace("\n", " ")
        print(f"| {r['check']} | {RESULT[r['ok']]} | {r['seconds']} | {detail} |")
    if not rows:
        print("| (no checks ran) | | | |")


if __name__ == "__main__":
    main()
