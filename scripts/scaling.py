"""Scaling tests: run `launch bench` over a P x M x batch matrix, write a CSV, PNG plots and a
markdown section (table, plots, machine).

    python scripts/scaling.py --config mistral-mini --P 1,2 --M 1,2,4 --batch 1,2,4,8 \\
        --out docs --csv /tmp/scaling.csv --md docs/benchmarks.md --naive --hf

On CPU each rank gets cores // P threads, so every P uses the whole machine; the extra rows
"P = 1 with one rank's threads" are the single-stage reference for pipeline efficiency:

    prefill: measured  tokens/s(P, M) / (P x tokens/s of the reference)   ideal  U / (U + P - 1)
             (U = units in flight = M x prefill chunks per prompt; M / (M + P - 1) with one chunk)
    decode:  measured  tokens/s(P, M) / (P x tokens/s of the reference)   ideal  1 (P x single stage),
             reachable only with M >= P (min(M, P) / P otherwise)

With CUDA each rank gets one GPU and P is capped at the number of GPUs.
The markdown section is written between `<!-- scaling:NAME:begin -->` and `<!-- scaling:NAME:end -->`
in --md, replacing an earlier one and keeping the rest of the file.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# A scaled-down Mistral 7B: same head_dim, GQA ratio, FFN ratio and window; the vocabulary is cut so
# that the output head costs about what it does in 7B relative to a layer (~0.6 layer).
PRESETS: dict[str, dict[str, Any]] = {
    "mistral-mini": dict(
        dim=1024,
        n_layers=8,
        head_dim=128,
        hidden_dim=3584,
        n_heads=8,
        n_kv_heads=2,
        norm_eps=1e-5,
        vocab_size=8192,
        sliding_window=4096,
    ),
}

FIELDS = [
    "P", "M", "batch", "threads", "device", "dtype", "prompt_len", "new_tokens", "chunk_size",
    "ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_ms_per_token",
    "peak_rss_max_gb", "weight_gb", "kv_bytes",
    "prefill_eff", "prefill_ideal", "decode_eff", "decode_ideal",
    "naive_prefill_tok_s", "naive_decode_tok_s", "hf_prefill_tok_s", "hf_decode_tok_s",
    "naive_vs_engine_decode", "hf_vs_engine_decode", "utilization", "busy_before", "load_avg", "wall_s",
]  # fmt: skip


def parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def wait_for_quiet(max_busy: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until the machine's CPUs are at most max_busy % busy; returns the last reading.
    Other jobs on a shared machine would otherwise be measured along with the engine."""
    import psutil

    t0 = time.monotonic()
    while True:
        busy = float(psutil.cpu_percent(interval=2.0))
        if busy <= max_busy or time.monotonic() - t0 >= max_wait:
            return busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_config(name: str, tmp: Path) -> Path:
    if name in PRESETS:
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(PRESETS[name]))
        return path
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--config {name}: not a file and not a preset ({', '.join(PRESETS)})")
    return path.resolve()


def run_bench(
    config: Path, p: int, m: int, batch: int, threads: int | None, a: argparse.Namespace, naive: bool, hf: bool
) -> dict[str, Any]:
    """One bench job (torchrun for P > 1); returns its JSON report."""
    flags = [
        "bench", "--config", str(config), "--num_pipeline_ranks", str(p), "--num_microbatches", str(m),
        "--batch_size", str(batch), "--prompt_len", str(a.prompt_len), "--new_tokens", str(a.new_tokens),
        "--dtype", a.dtype, "--repeat", str(a.repeat), "--warmup", str(a.warmup), "--device", a.device,
        "--json", "--quiet",
    ]  # fmt: skip
    if threads is not None:
        flags += ["--threads", str(threads)]
    if a.chunk_size:
        flags += ["--chunk_size", str(a.chunk_size)]
    if naive:
        flags.append("--compare_naive")
    if hf:
        flags.append("--compare_hf")
    if p == 1:
        cmd = [sys.executable, "-m", "launch", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p),
               "--master-port", str(free_port()), "-m", "launch", *flags]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=a.timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    line = next(x for x in reversed(r.stdout.splitlines()) if x.startswith("{"))
    report: dict[str, Any] = json.loads(line)
    report["wall_s"] = time.monotonic() - t0
    return report


def row_of(rep: dict[str, Any], threads: int | None) -> dict[str, Any]:
    peers = rep["peers"]
    naive, hf = peers.get("naive", {}), peers.get("transformers", {})
    return {
        "P": rep["num_pipeline_ranks"],
        "M": rep["num_microbatches"],
        "batch": rep["batch_size"],
        "threads": threads if threads is not None else rep["threads_per_rank"][0],
        "device": rep["device"],
        "dtype": rep["dtype"],
        "prompt_len": rep["prompt_len"],
        "new_tokens": rep["new_tokens"],
        "chunk_size": rep["chunk_size"],
        "ttft_ms": 1000 * rep["ttft_s"],
        "prefill_tok_s": rep["prefill_tok_s"],
        "decode_tok_s": rep["decode_tok_s"],
        "decode_ms_per_token": rep["decode_ms_per_token"],
        "peak_rss_max_gb": max(rep["peak_rss_bytes"]) / 1e9,
        "weight_gb": rep["weight_bytes"] / 1e9,
        "kv_bytes": rep["kv_bytes"],
        "utilization": "/".join(f"{u:.2f}" for u in rep.get("utilization", []) if u is not None),
        "naive_prefill_tok_s": naive.get("prefill_tok_s"),
        "naive_decode_tok_s": naive.get("decode_tok_s"),
        "hf_prefill_tok_s": hf.get("prefill_tok_s"),
        "hf_decode_tok_s": hf.get("decode_tok_s"),
        "naive_vs_engine_decode": naive.get("vs_engine", {}).get("decode_tok_s"),
        "hf_vs_engine_decode": hf.get("vs_engine", {}).get("decode_tok_s"),
        "load_avg": rep["machine"].get("load_average_1min"),
        "wall_s": rep["wall_s"],
        "_machine": rep["machine"],
        "_ref": False,
    }


def add_efficiency(rows: list[dict[str, Any]]) -> None:
    """Efficiency of each P > 1 row against P x the single-stage reference (same batch)."""
    refs = {r["batch"]: r for r in rows if r["_ref"]}
    if not refs:  # on GPUs (or one core) the P = 1 rows are the single-stage reference
        refs = {r["batch"]: r for r in rows if r["P"] == 1}
    for r in rows:
        ref = refs.get(r["batch"])
        units = r["M"] * math.ceil(r["prompt_len"] / r["chunk_size"])
        r["prefill_ideal"] = units / (units + r["P"] - 1)
        r["decode_ideal"] = min(r["M"], r["P"]) / r["P"]
        if ref is None or r is ref or r["P"] == 1:
            r["prefill_eff"] = r["decode_eff"] = None
            continue
        r["prefill_eff"] = r["prefill_tok_s"] / (r["P"] * ref["prefill_tok_s"])
        d, dref = r["decode_tok_s"], ref["decode_tok_s"]
        r["decode_eff"] = d / (r["P"] * dref) if d and dref else None


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*FIELDS, "reference"])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in FIELDS}, "reference": int(r["_ref"])})


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by write_csv, numbers as numbers (for --replot)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if v == "":
                    row[k] = None
                elif k in ("device", "dtype", "utilization"):
                    row[k] = v
                else:
                    row[k] = float(v) if any(c in v for c in ".e") or v in ("inf", "nan") else int(v)
            row["_ref"] = bool(row.pop("reference"))
            rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    main = [r for r in rows if not r["_ref"]]
    refs = {r["batch"]: r for r in rows if r["_ref"]} or {r["batch"]: r for r in rows if r["P"] == 1}
    bmax = max(r["batch"] for r in main)
    ps, ms = sorted({r["P"] for r in main}), sorted({r["M"] for r in main})
    files = []

    # 1. throughput vs P at the largest batch. Every series starts at the single-stage reference
    # (P = 1 with one rank's threads) so that P is the only change along a line; the ideal is
    # P x the reference; P = 1 with all the machine's threads is a separate marker.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ref = refs.get(bmax)
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        start = [(1, ref[key])] if ref is not None and ref[key] else []
        for m in ms:
            pts = sorted((r["P"], r[key]) for r in main if r["M"] == m and r["P"] > 1 and r["batch"] == bmax and r[key])
            if pts:
                ax.plot(*zip(*(start + pts), strict=True), marker="o", label=f"M={m}")
        if start:
            ax.plot(ps, [p * start[0][1] for p in ps], "k--", label="P x single stage (ideal)")
        for r in main:
            if r["P"] == 1 and r["batch"] == bmax and r[key] and r is not ref:
                ax.plot([1], [r[key]], "k*", markersize=10, label=f"P=1, {r['threads']} threads")
        ax.set(title=f"{title}, batch {bmax}", xlabel="pipeline stages P", ylabel="tokens/s", xticks=ps)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / f"{name}_throughput_vs_P.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    # 2. throughput vs M at the largest P, one line per batch.
    pmax = max(ps)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        for b in sorted({r["batch"] for r in main}):
            pts = sorted((r["M"], r[key]) for r in main if r["P"] == pmax and r["batch"] == b and r[key])
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"batch {b}")
        ax.set(title=f"{title}, P={pmax}", xlabel="micro-batches M", ylabel="tokens/s", xticks=ms)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / f"{name}_throughput_vs_M.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    # 3. pipeline efficiency against the ideal, per P > 1, at the largest batch.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "prefill", "prefill"), (axes[1], "decode", "decode")):
        for p in [p for p in ps if p > 1]:
            sel = sorted((r for r in main if r["P"] == p and r["batch"] == bmax), key=lambda r: r["M"])
            meas = [(r["M"], r[f"{key}_eff"]) for r in sel if r[f"{key}_eff"] is not None]
            ideal = [(r["M"], r[f"{key}_ideal"]) for r in sel]
            if meas:
                (line,) = ax.plot(*zip(*meas, strict=True), marker="o", label=f"P={p} measured")
                ax.plot(*zip(*ideal, strict=True), "--", color=line.get_color(), label=f"P={p} ideal")
        ax.set(title=f"{title} efficiency vs P x single stage, batch {bmax}", xlabel="micro-batches M",
               ylabel="efficiency", xticks=ms, ylim=(0, 1.2))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / f"{name}_efficiency.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict[str, Any]], pngs: list[Path], md: Path, name: str, command: str, config: str,
             config_args: dict[str, Any], cores: int) -> str:  # fmt: skip
    m = rows[0]["_machine"]
    loads = [r["load_avg"] for r in rows if r["load_avg"] is not None]
    busy = [r["busy_before"] for r in rows if r.get("busy_before") is not None]
    lines = [
        f"### Scaling matrix: `{name}`",
        "",
        f"Model: `{config}` {json.dumps(config_args)}, random weights, {rows[0]['dtype']}, "
        f"prompt {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} new tokens, chunk {rows[0]['chunk_size']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, torch {m['torch']}, "
        f"Python {m['python']}" + (f", GPU {m['gpu']}" if "gpu" in m else "") + ".",
        (
            f"1-minute load average at the end of each job: {min(loads):.1f} to {max(loads):.1f} "
            f"(the machine has {cores} cores and may be shared)"
            if loads
            else ""
        )
        + (f"; CPU busy just before each job: {min(busy):.0f}% to {max(busy):.0f}%." if busy else "."),
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "Efficiency: tokens/s divided by P x the single-stage reference (P = 1 with one rank's threads, "
        "rows marked *ref*). Ideal: U/(U+P-1) for prefill (U = M x chunks per prompt), "
        "min(M, P)/P for decode. Peers: vs engine = peer decode tokens/s / engine decode tokens/s.",
        "",
        "| P | M | batch | threads/rank | TTFT ms | prefill tok/s | decode tok/s | ms/token | prefill eff (ideal) "
        "| decode eff (ideal) | utilisation per rank | peak RSS GB (max rank) | KV MB | naive vs engine "
        "| HF vs engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch"], r["P"], r["threads"], r["M"])):
        ref = " *ref*" if r["_ref"] else ""
        lines.append(
            f"| {r['P']} | {r['M']} | {r['batch']} | {r['threads']}{ref} | {_f(r['ttft_ms'])} "
            f"| {_f(r['prefill_tok_s'])} | {_f(r['decode_tok_s'])} | {_f(r['decode_ms_per_token'], '.2f')} "
            f"| {_f(r['prefill_eff'], '.2f')} ({_f(r['prefill_ideal'], '.2f')}) "
            f"| {_f(r['decode_eff'], '.2f')} ({_f(r['decode_ideal'], '.2f')}) "
            f"| {r['utilization'] or '-'} | {_f(r['peak_rss_max_gb'], '.3f')} | {_f(r['kv_bytes'] / 1e6, '.2f')} "
            f"| {_f(r['naive_vs_engine_decode'], '.2f')} | {_f(r['hf_vs_engine_decode'], '.2f')} |"
        )
    # Equal resources: P stages of one core's threads each against P = 1 with all of them.
    full = {(r["batch"]): r for r in rows if r["P"] == 1 and not r["_ref"]}
    eq = [r for r in rows if r["P"] > 1 and r["M"] == r["P"] and r["batch"] in full]
    if eq:
        lines += [
            "",
            "Equal resources (the whole machine either way): P stages, M = P, against P = 1:",
            "",
            "| batch | P | decode tok/s | P = 1 decode tok/s | ratio | prefill ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(eq, key=lambda r: (r["batch"], r["P"])):
            f1 = full[r["batch"]]
            dr = r["decode_tok_s"] / f1["decode_tok_s"] if r["decode_tok_s"] and f1["decode_tok_s"] else None
            lines.append(
                f"| {r['batch']} | {r['P']} | {_f(r['decode_tok_s'])} | {_f(f1['decode_tok_s'])} "
                f"| {_f(dr, '.2f')} | {r['prefill_tok_s'] / f1['prefill_tok_s']:.2f} |"
            )
    lines.append("")
    for png in pngs:
        rel = os.path.relpath(png, md.parent)
        lines.append(f"![{png.stem}]({rel})")
    lines.append("")
    return "\n".join(lines)


def write_section(md: Path, tag: str, body: str) -> None:
    """Replace (or append) the block between `<!-- {tag}:begin -->` and `<!-- {tag}:end -->` in md."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = md.read_text() if md.is_file() else "# Benchmarks\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.json", help=f"a params.json path or a preset: {list(PRESETS)}")
    ap.add_argument("--P", default="1,2", help="pipeline stages, comma-separated")
    ap.add_argument("--M", default="1,2", help="micro-batches, comma-separated (rows with M > batch are skipped)")
    ap.add_argument("--batch", default="1,2", help="batch sizes, comma-separated")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--chunk_size", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=3, help="measured runs per row (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--naive", action="store_true", help="measure the naive schedule in the rows with M = P")
    ap.add_argument("--hf", action="store_true", help="measure transformers in the P = 1 rows (all threads)")
    ap.add_argument("--out", default="scaling-out", help="folder for the PNG plots (and the CSV)")
    ap.add_argument("--csv", default=None, help="CSV path (default: OUT/NAME.csv)")
    ap.add_argument("--md", default=None, help="markdown file to write the section into (default: OUT/benchmarks.md)")
    ap.add_argument("--name", default=None, help="name of this matrix in file names (default: the config's)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per bench job")
    ap.add_argument("--replot", default=None, help="only draw the PNGs again from this CSV (written by a run)")
    ap.add_argument("--quiet_cpu", type=float, default=100, help="before each job wait until CPUs are <= this %% busy")
    ap.add_argument("--max_wait", type=float, default=300, help="the longest wait for --quiet_cpu, seconds")
    a = ap.parse_args(argv)

    if a.replot:
        old = read_csv(Path(a.replot))
        pngs = plot(old, Path(a.out), a.name or Path(a.replot).stem)
        print(f"wrote {', '.join(map(str, pngs))}", file=sys.stderr)
        return old

    import torch

    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    cores = torch.cuda.device_count() if cuda else len(os.sched_getaffinity(0))
    name = a.name or Path(a.config).stem
    out = Path(a.out)
    ps = [p for p in parse_ints(a.P) if not cuda or p <= cores]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve_config(a.config, Path(tmp))
        config_args = json.loads(config.read_text())
        plan: list[tuple[int, int, int, int | None, bool]] = []  # P, M, batch, threads, reference
        for b in parse_ints(a.batch):
            if not cuda and cores > 1 and 1 in ps:
                plan.append((1, 1, b, max(1, cores // max(ps)), True))
            for p in ps:
                for m in parse_ints(a.M):
                    if m > b or (p == 1 and m > 1):
                        continue
                    plan.append((p, m, b, None if cuda else max(1, cores // p), False))
        for i, (p, m, b, threads, ref) in enumerate(plan):
            naive = a.naive and p > 1 and m == p
            hf = a.hf and p == 1 and not ref
            what = f"P={p} M={m} batch={b} threads={threads}{' (reference)' if ref else ''}"
            busy = wait_for_quiet(a.quiet_cpu, a.max_wait) if a.quiet_cpu < 100 else None
            print(f"[{i + 1}/{len(plan)}] {what}", file=sys.stderr, flush=True)
            rep = run_bench(config, p, m, b, threads, a, naive, hf)
            row = row_of(rep, threads)
            row["busy_before"] = busy
            row["_ref"] = ref
            rows.append(row)
            print(f"    prefill {row['prefill_tok_s']:.1f} tok/s, decode {_f(row['decode_tok_s'])} tok/s, "
                  f"{row['wall_s']:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    add_efficiency(rows)
    csv_path = Path(a.csv) if a.csv else out / f"{name}.csv"
    write_csv(rows, csv_path)
    pngs = plot(rows, out, name)
    md = Path(a.md) if a.md else out / "benchmarks.md"
    command = "python scripts/scaling.py " + " ".join(sys.argv[1:] if argv is None else list(argv))
    write_section(md, f"scaling:{name}", markdown(rows, pngs, md, name, command, a.config, config_args, cores))
    print(f"wrote {csv_path}, {', '.join(map(str, pngs))}, {md}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
