"""The engine's bf16 kernel (--cpu_linear blocked; whichever build this CPU takes: AVX512-BF16 or AVX2)
against torch's own bf16 GEMM, oneDNN's packed layout where this CPU can pack bf16, and an fp32 GEMM on
the same weight, from 1 to 64 rows a call; with the read probes of `bench --bandwidth` beside them.
Interleaved rounds over several weights (out of cache); medians and ranges of GB/s of bf16 weight read.

    python scripts/bf16_rows.py --threads 2 --rows 1,2,4,16,64 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# This checkout's engine, not whichever one `pip install -e` pointed at: comparisons run this script
# from two checkouts in turn.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.cpu_kernels import blocked_kernels, blocked_kernels_error, packing_error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,16,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weights", type=int, default=3, help="14336 x 4096 bf16 weights cycled through (117 MB each)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    k = blocked_kernels(log=True)
    if k is None:
        raise SystemExit(f"the engine's kernels cannot be built here: {blocked_kernels_error()}")
    n, kk = 14336, 4096
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(n, kk, generator=g) / kk**0.5).to(torch.bfloat16) for _ in range(a.weights)]
    kernels: dict[str, tuple[list[torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
        f"engine ({k.ISA})": ([k.block_weight(w) for w in ws], k.blocked_linear),
        "torch bf16": (ws, F.linear),
        "torch fp32 (x and w in fp32)": ([w.float() for w in ws], lambda x, w: F.linear(x.float(), w)),
    }
    if not packing_error():
        mk = torch.ops.mkldnn
        kernels["oneDNN packed"] = (
            [mk._reorder_linear_weight(w, 1) for w in ws],
            lambda x, w: mk._linear_pointwise(x, w, None, "none", [], ""),
        )
    else:
        print(f"oneDNN packed: left out ({packing_error()})")
    rows = [int(r) for r in a.rows.split(",")]
    x = {m: torch.randn(m, kk, generator=g).to(torch.bfloat16) for m in rows}
    ref = {m: F.linear(x[m].double(), ws[0].double()) for m in rows}
    for name, (wl, fn) in kernels.items():  # every candidate against a float64 product first
        for m in rows:
            err = (fn(x[m], wl[0]).double() - ref[m]).abs().max().item()
            assert err <= 0.05 * ref[m].abs().max().item(), (name, m, err)
    gbs: dict[tuple[str, int], list[float]] = {(name, m): [] for name in kernels for m in rows}
    buf = torch.ones(512 * 2**20 // 4)
    probes: list[float] = []
    for _ in range(a.rounds):
        for m in rows:
            for name, (wl, fn) in kernels.items():
                t0 = time.perf_counter()
                for w in wl:
                    fn(x[m], w)
                gbs[(name, m)].append(len(wl) * n * kk * 2 / (time.perf_counter() - t0) / 1e9)
        for s in (1, 4):
            t0 = time.perf_counter()
            k.read_probe(buf, s)
            probes.append(buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    best, mid = max(probes), statistics.median(probes)
    print(f"read probe (engine's sum, 1 and 4 streams a thread): best {best:.1f} GB/s, median {mid:.1f}")
    print("| kernel | " + " | ".join(f"{m} row{'s' if m > 1 else ''}" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in kernels:
        cells = []
        for m in rows:
            v = gbs[(name, m)]
            cells.append(f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("(GB/s of bf16 weight bytes read per call, median [min-max] over rounds; x rows a call)")


if __name__ == "__main__":
    main()
