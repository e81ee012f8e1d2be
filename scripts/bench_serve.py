"""Benchmark `python -m launch serve`: closed loop at several concurrencies, Poisson arrivals at
several rates, against the same engine serving one static batch at a time.

    python scripts/bench_serve.py --config tiny --P 1,2 --out /tmp/bench-serve-tiny.json
    python scripts/bench_serve.py --config mistral-mini --P 1,2 --out /tmp/bench-serve-mini.json

For each P it writes a random-weights checkpoint of the config, starts the server (torchrun for
P > 1) on 127.0.0.1, and sends token-id prompts (lengths and max_tokens drawn from fixed ranges with
a fixed seed; greedy) as streamed /v1/completions. Per request: time to first token (TTFT) and
the gaps between streamed tokens (inter-token latency, ITL: the server streams a chunk per token,
its text empty while a character's bytes are held back), and the gaps between chunks that carry
text (longer where a character spans byte tokens: the tokenizer's, not the scheduler's). The goals
of issue 10, measured in one run:
  1. closed loop at concurrency 16: output tokens/s >= 0.9x one static batch of 16 of the same
     prompts (the server with --static_batching, all 16 sent at once: exactly a static generate;
     the median of three such batches);
  2. Poisson arrivals at 70% of the capacity (requests/s at concurrency 16): >= 2x the throughput
     of the same arrivals served one static batch at a time (--static_batching);
  3. ITL p99 <= 3x p50 in that Poisson run, where new prompts are prefilled all the time.
A progress line per measurement goes to stderr; the JSON has every number and the conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from scaling import PRESETS, free_port  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Server:
    def __init__(self, model: Path, p: int, flags: list[str], logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["-m", "launch", "serve", str(model), "--port", str(self.port), "--num_pipeline_ranks", str(p),
                "--model_name", "m", *flags]
        cmd = [sys.executable, *args] if p == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p), "--master-port",
            str(free_port()), *args]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.log = open(logdir / f"serve-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


async def one(client: httpx.AsyncClient, url: str, req: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "m", "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []  # per token
    text_times: list[float] = []  # per chunk that carries text
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                raise RuntimeError(msg["error"]["message"])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            now = time.perf_counter()
            # The server streams one chunk per generated token (its text empty while bytes of a
            # character are held back); the end comes as a chunk with a finish_reason.
            if any(c.get("finish_reason") is None for c in msg["choices"]):
                times.append(now)
            if any(c.get("text") for c in msg["choices"]):
                text_times.append(now)
    end = time.perf_counter()
    return {"start": t0, "end": end, "ttft": (times[0] - t0) if times else end - t0,
            "itl": gaps(times), "itl_text": gaps(text_times), "tokens": tokens}


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def summarize(results: list[dict[str, Any]], span: float) -> dict[str, float]:
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    itl_text = [x for r in results for x in r["itl_text"]]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "seconds": span, "requests_s": len(results) / span,
            "output_tok_s": tokens / span, "output_tokens": tokens,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
            # between chunks with text: longer where a character spans byte tokens
            "text_gap_p50_ms": pct(itl_text, 50) * 1e3, "text_gap_p99_ms": pct(itl_text, 99) * 1e3}


def latencies(r: dict[str, float]) -> str:
    """A progress line's tokens/s, TTFT and ITL part."""
    return (f"{r['output_tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} p99 {r['ttft_p99_ms']:.0f} ms, ITL p50 "
            f"{r['itl_p50_ms']:.1f} p99 {r['itl_p99_ms']:.1f} ms (text gaps p50 {r['text_gap_p50_ms']:.1f} "
            f"p99 {r['text_gap_p99_ms']:.1f})")


async def closed_loop(url: str, work: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    todo = list(work)
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        async def worker() -> None:
            while todo:
                out.append(await one(c, url, todo.pop(0)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summarize(out, time.perf_counter() - t0)


async def open_loop(url: str, work: list[dict[str, Any]], rate: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(work) + 4)) as c:
        t0 = time.perf_counter()
        tasks, at = [], 0.0
        for req in work:
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(c, url, req)))
        out = await asyncio.gather(*tasks)
        return summarize(list(out), max(r["end"] for r in out) - t0) | {"rate": rate}


def workload(n: int, vocab: int, lens: tuple[int, int], new: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(*lens) - 1)],
             "max_tokens": rng.randint(*new)} for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="tiny, a preset of scripts/scaling.py, or a params.json")
    ap.add_argument("--P", default="1,2")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--rates", default="0.35,0.7,1.0", help="Poisson rates as fractions of the c=16 capacity")
    ap.add_argument("--requests", type=int, default=48, help="requests per closed-loop level (at least 2x c)")
    ap.add_argument("--prompt_len", default="8,96")
    ap.add_argument("--max_tokens", default="8,64")
    ap.add_argument("--max_batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (more oversubscribes a busy host)")
    ap.add_argument("--extra", default="", help="more serve flags, space-separated")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lens = tuple(int(x) for x in a.prompt_len.split(","))
    new = tuple(int(x) for x in a.max_tokens.split(","))
    report: dict[str, Any] = {"config": a.config, "conditions": {
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "prompt_len": lens, "max_tokens": new,
        "max_batch": a.max_batch, "greedy": True}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if a.config == "tiny":
            config = REPO / "configs" / "tiny.json"
        elif a.config in PRESETS:
            # serve needs a tokenizer that matches the vocabulary: the repository's 512-piece one
            config = tmp / "preset.json"
            config.write_text(json.dumps(PRESETS[a.config] | {"vocab_size": 512}))
        else:
            config = Path(a.config)
        vocab = json.loads(config.read_text())["vocab_size"]
        model = tmp / "model"
        subprocess.run([sys.executable, "-m", "launch", "make-checkpoint", "--config", str(config), str(model)],
                       cwd=REPO, check=True, timeout=600)
        for p in [int(x) for x in a.P.split(",")]:
            threads = a.threads
            flags = ["--max_batch", str(a.max_batch), "--threads", str(threads), "--dist_timeout", "120",
                     *a.extra.split()]
            run: dict[str, Any] = {"P": p, "threads_per_rank": threads, "closed": [], "poisson": []}
            srv = Server(model, p, flags, tmp)
            try:
                asyncio.run(closed_loop(srv.url, workload(4, vocab, lens, new, 99), 4))  # warm-up
                for c in [int(x) for x in a.concurrency.split(",")]:
                    r = asyncio.run(closed_loop(srv.url, workload(max(a.requests, 2 * c), vocab, lens, new, c), c))
                    run["closed"].append(r | {"concurrency": c})
                    log(f"P={p} closed c={c}: {r['requests_s']:.2f} req/s, {latencies(r)}")
                cap = next((r["requests_s"] for r in run["closed"] if r["concurrency"] == 16),
                           max(r["requests_s"] for r in run["closed"]))
                poisson_work = workload(a.requests, vocab, lens, new, 7)
                for f in [float(x) for x in a.rates.split(",")]:
                    r = asyncio.run(open_loop(srv.url, poisson_work, f * cap, 11))
                    run["poisson"].append(r | {"fraction": f})
                    log(f"P={p} poisson {f:.0%} of {cap:.2f} req/s: {r['requests_s']:.2f} req/s, {latencies(r)}")
            finally:
                srv.stop()
            srv = Server(model, p, [*flags, "--static_batching"], tmp)
            try:
                batch16 = workload(16, vocab, lens, new, 16)
                asyncio.run(closed_loop(srv.url, workload(4, vocab, lens, new, 99), 4))  # warm-up
                # three batches, the median counts: one batch is a few seconds, and this machine's
                # memory bandwidth changes within seconds
                runs16 = [asyncio.run(closed_loop(srv.url, batch16, 16)) for _ in range(3)]
                run["static_batch_16_runs"] = runs16
                run["static_batch_16"] = sorted(runs16, key=lambda r: r["output_tok_s"])[1]
                r = asyncio.run(open_loop(srv.url, poisson_work, 0.7 * cap, 11))
                run["static_poisson_70"] = r
                each = ", ".join(f"{x['output_tok_s']:.0f}" for x in runs16)
                log(f"P={p} static: batch of 16 {run['static_batch_16']['output_tok_s']:.0f} tok/s (median of "
                    f"{each}); poisson 70%: "
                    f"{r['requests_s']:.2f} req/s, {r['output_tok_s']:.0f} tok/s")
            finally:
                srv.stop()
            c16 = next((r for r in run["closed"] if r["concurrency"] == 16), None)
            p70 = next((r for r in run["poisson"] if abs(r["fraction"] - 0.7) < 1e-9), None)
            run["goals"] = {
                "c16_vs_static_batch": c16["output_tok_s"] / run["static_batch_16"]["output_tok_s"] if c16 else None,
                "poisson70_vs_static": p70["requests_s"] / run["static_poisson_70"]["requests_s"] if p70 else None,
                "poisson70_itl_p99_over_p50": p70["itl_p99_ms"] / p70["itl_p50_ms"] if p70 else None,
            }
            log(f"P={p} goals: {json.dumps(run['goals'])}")
            report["runs"].append(run)
    report["conditions"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
