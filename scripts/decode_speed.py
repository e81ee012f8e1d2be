"""Decode speed before/after issue 12, interleaved: each round runs every variant once, in turn, so
that a change in the shared machine's load hits all of them alike; medians and ranges over rounds.

    python scripts/decode_speed.py --config configs/tiny.json --rounds 7 --md docs/benchmarks.md
    python scripts/decode_speed.py --model /tmp/m7b-hf --dtype bfloat16 --rounds 2 --new_tokens 8 \
        --prompt_len 16 --variants separate,fused --bandwidth --tag decode-7b --md docs/benchmarks.md

Variants (each one `python -m launch bench ... --json` job, batch 1, P = 1):
  separate   the checkpoint's separate wq/wk/wv, w1/w3 linears, eager (the engine before issue 12)
  fused      fused wqkv / w13, eager (the default now: at batch 1 the blocked bf16 kernel where available)
  onednn, blocked
             fused, with the bf16 linears on oneDNN's packed layout / the engine's AVX512-BF16 kernel
  compiled   fused, decode steps through torch.compile (--compile; compile time reported apart)
  int8, int4 fused, weights quantized at load (--quantize; issue 11), on the engine's kernels
  int8g      int8 with an fp16 scale per 32 inputs (--group_size 32, GGUF Q8_0's layout)
  int8-torch, int4-torch
             through PyTorch's packed kernels (--cpu_linear onednn), the engine before it had its own
  llama-bf16, llama-q8_0, llama-q4_0
             llama.cpp's llama-bench on `<--gguf_prefix>-<type>.gguf` (scripts/llamacpp_peer.py makes
             and benches them; a job that cannot run is reported as skipped with its reason)
  hf         transformers' generate on the same tensors (the `separate` job's --compare_hf peer)
  <variant>-4k
             that variant with THP_MEM_ALLOC_ENABLE=0: weights in 4 KiB pages, the engine before it
             asked for transparent huge pages (launch/__init__.py)
  <variant>-active
             that variant with OMP_WAIT_POLICY=ACTIVE (idle OpenMP workers spin instead of sleeping;
             faster between small ops where nothing else wants the cores, as llama.cpp's own pool)
With --bandwidth every engine job also reports the decode floor; the floor used here is each
variant's streamed bytes over the best read bandwidth seen in any job of the run (the machine's
bandwidth varies).

    python scripts/decode_speed.py --config configs/mistral-7b.json --dtype bfloat16 --rounds 3 \
        --variants fused,int8,int4,llama-bf16,llama-q8_0,llama-q4_0 --gguf_prefix /work/peers/m7b \
        --prompt_len 32 --new_tokens 32 --repeat 2 --bandwidth
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaling import wait_for_quiet, write_section  # scripts/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
FLAGS = {
    "separate": ["--separate_projections"],
    "fused": [],
    "onednn": ["--cpu_linear", "onednn"],
    "blocked": ["--cpu_linear", "blocked"],
    "compiled": ["--compile"],
    "int8": ["--quantize", "int8"],
    "int8g": ["--quantize", "int8", "--group_size", "32"],
    "int8-torch": ["--quantize", "int8", "--cpu_linear", "onednn"],
    "int4": ["--quantize", "int4"],
    "int4-torch": ["--quantize", "int4", "--cpu_linear", "onednn"],
}


def llama_job(a: argparse.Namespace, variant: str) -> dict[str, Any]:
    """llama.cpp's decode ms/token for `<gguf_prefix>-<type>.gguf` through scripts/llamacpp_peer.py."""
    gguf = f"{a.gguf_prefix}-{variant.removeprefix('llama-')}.gguf"
    cmd = [sys.executable, str(REPO / "scripts" / "llamacpp_peer.py"), "bench", gguf, "--threads", str(a.threads),
           "--prompt", str(a.prompt_len), "--gen", str(a.new_tokens), "--repeat", str(a.repeat),
           "--depth", str(a.llama_depth)]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("{")))
    out["command"] = " ".join(["python", *cmd[1:]])
    return out


def job(a: argparse.Namespace, variant: str, hf: bool) -> dict[str, Any]:
    model = ["--config", a.config] if a.config else [a.model]
    base = variant.removesuffix("-active").removesuffix("-4k")
    cmd = [sys.executable, "-m", "launch", "bench", *model, "--batch_size", "1", "--threads", str(a.threads),
           "--prompt_len", str(a.prompt_len), "--new_tokens", str(a.new_tokens), "--repeat", str(a.repeat),
           "--warmup", "1", "--json", "--quiet", "--dist_timeout", "1800", *FLAGS[base]]  # fmt: skip
    if a.dtype:
        cmd += ["--dtype", a.dtype]
    if hf:
        cmd.append("--compare_hf")
    if a.bandwidth:
        cmd.append("--bandwidth")
    policy = "ACTIVE" if variant.endswith("-active") else a.omp_wait_policy
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY=policy)
    if "-4k" in variant:
        env["THP_MEM_ALLOC_ENABLE"] = "0"
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=a.timeout)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("{")))
    thp = ["THP_MEM_ALLOC_ENABLE=0"] if "-4k" in variant else []
    out["command"] = " ".join([*thp, "OMP_WAIT_POLICY=" + policy, "python", *cmd[1:]])
    return out


def read_gbs(bandwidth: dict[str, float]) -> float:
    """A job's read bandwidth: the better of its probes (torch's sum, the AVX-512 sum where built)."""
    return max(bandwidth["read_gbs"], bandwidth.get("read_simd_gbs", 0.0))


def spread(xs: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="params.json preset: random weights built in memory")
    ap.add_argument("--model", default=None, help="a model directory or file instead of --config")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="measured runs per job (the job reports their median)")
    ap.add_argument("--llama_depth", type=int, default=0,
                    help="llama.cpp jobs: tokens in the cache before its tests (llama-bench -d). Its decode test "
                    "starts from an empty cache otherwise, while the engine decodes after --prompt_len tokens: "
                    "pass the same number to compare decode at a long context")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="separate,fused,compiled")
    ap.add_argument("--hf", action="store_true", help="transformers peer in the `separate` job")
    ap.add_argument("--bandwidth", action="store_true")
    ap.add_argument("--omp_wait_policy", default="PASSIVE")
    ap.add_argument("--quiet_cpu", type=float, default=None, help="wait until the CPUs are at most this %% busy")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--gguf_prefix", default="/work/peers/m7b", help="llama-* variants: <prefix>-<type>.gguf")
    ap.add_argument("--tag", default="decode-tiny")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json_out", type=Path, default=None)
    a = ap.parse_args(argv)
    if (a.config is None) == (a.model is None):
        raise SystemExit("give --config or --model")
    variants = a.variants.split(",")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    loads: list[float] = []
    t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for i in range(a.rounds):
        for v in variants:
            if a.quiet_cpu is not None:
                wait_for_quiet(a.quiet_cpu, 120)
            loads.append(os.getloadavg()[0])
            r = llama_job(a, v) if v.startswith("llama-") else job(a, v, hf=a.hf and v == variants[0])
            runs[v].append(r)
            print(f"round {i + 1}/{a.rounds} {v}: {r['decode_ms_per_token']:.3f} ms/token", file=sys.stderr, flush=True)
    if a.json_out:
        a.json_out.write_text(json.dumps(runs))
    ms = {v: [r["decode_ms_per_token"] for r in rs] for v, rs in runs.items()}
    base = variants[0]
    lines = [
        f"Measured {t_start}, {a.rounds} interleaved rounds, each job the median of {a.repeat} runs after 1 "
        f"warm-up; batch 1, prompt {a.prompt_len}, {a.new_tokens} new tokens, {a.threads} threads, "
        f"OMP_WAIT_POLICY={a.omp_wait_policy}; 1-minute load average before each job "
        f"{min(loads):.1f}-{max(loads):.1f} (2 cores, shared with other jobs).",
        "",
        f"| variant | decode ms/token, median [min-max] | tokens/s (median) | vs `{base}` (same round) | other |",
        "|---|---|---|---|---|",
    ]
    hf_ms = [r["peers"]["transformers"]["decode_ms_per_token"] for r in runs[base]] if a.hf else []
    engine_ranks = [rk for rs in runs.values() for r in rs for rk in r.get("ranks", [])]
    bws = [read_gbs(rk["bandwidth"]) for rk in engine_ranks if "bandwidth" in rk]
    best_bw = max(bws, default=0.0)
    for v in variants:
        ratio = [b / x for b, x in zip(ms[base], ms[v], strict=True)]
        other = []
        comp = [r["ranks"][0].get("compile_s") or 0 for r in runs[v]] if "ranks" in runs[v][0] else []
        if any(comp):
            other.append(f"compile {spread(comp, '.1f')} s once")
        if hf_ms:
            other.append(f"{spread([h / x for h, x in zip(hf_ms, ms[v], strict=True)])}x transformers' speed")
        other.append(f"prefill {spread([r['prefill_tok_s'] for r in runs[v]], '.1f')} tok/s")
        if runs[v][0].get("peak_rss_bytes"):
            other.append(f"peak RSS {max(max(r['peak_rss_bytes']) for r in runs[v]) / 1e9:.2f} GB")
        if best_bw and "ranks" in runs[v][0]:
            floor = 1000 * runs[v][0]["ranks"][0]["streamed_bytes"] / (best_bw * 1e9)
            other.append(f"{statistics.median(ms[v]) / floor:.2f}x floor, best {min(ms[v]) / floor:.2f}x")
            # The bandwidth changes between jobs: each job's weight read rate against its own probe.
            own = [r["ranks"][0]["streamed_bytes"] / (r["decode_ms_per_token"] / 1000) / 1e9
                   / read_gbs(r["ranks"][0]["bandwidth"]) for r in runs[v] if "bandwidth" in r["ranks"][0]]  # fmt: skip
            if own:
                other.append(f"weights read at {spread([100 * o for o in own], '.0f')} % of the job's own probe")
        lines.append(f"| {v} | {spread(ms[v], '.3f')} | {1000 / statistics.median(ms[v]):.1f} | "
                     f"{spread(ratio)}x faster | {'; '.join(other)} |")  # fmt: skip
    if hf_ms:
        hf_rate = 1000 / statistics.median(hf_ms)
        lines.append(f"| transformers `generate` | {spread(hf_ms, '.3f')} | {hf_rate:.1f} | | |")
    if best_bw:
        streamed = runs[base][0]["ranks"][0]["streamed_bytes"]
        lines += ["", f"Floor: {streamed / 1e9:.2f} GB streamed per token / best read bandwidth of the run "
                  f"{best_bw:.1f} GB/s = {1000 * streamed / (best_bw * 1e9):.0f} ms/token."]  # fmt: skip
    lines += ["", "Commands (one job each, interleaved):", ""]
    lines += [f"    {runs[v][0]['command']}" for v in variants]
    body = "\n".join(lines) + "\n"
    print(body)
    if a.md:
        write_section(a.md, a.tag, body)


if __name__ == "__main__":
    main()
