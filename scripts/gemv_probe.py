"""Which bf16 matrix-vector kernel reads weights at this machine's bandwidth? (issue 12, item 3)

Streams one 7B layer's worth of linears (fused shapes: wqkv, wo, w13, w2), repeated over enough
layers to leave the caches far behind, through each candidate kernel at batch 1, and prints GB/s
of weights read next to the machine's read bandwidth measured in between (best of several probes,
since a shared machine's bandwidth varies within seconds). Every candidate is checked against
F.linear's result first.

    OMP_WAIT_POLICY=PASSIVE python scripts/gemv_probe.py --threads 2 --layers 6 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}  # [out, in]
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def read_bandwidth(nbytes: int, iters: int = 5) -> float:
    """GB/s of a sum over a large fp32 buffer (reads only; bench --bandwidth's read figure), best of iters.
    (A bf16 sum is no probe: torch converts as it goes and runs far below the memory's speed.)"""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def candidates() -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Kernel]]:
    """name -> (prepare the weight once, run x @ w.T)."""
    out: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Kernel]] = {
        "F.linear bf16": (lambda w: w, lambda x, w: F.linear(x, w)),
        "torch.mv (w @ x)": (lambda w: w, lambda x, w: torch.mv(w, x[0])[None]),
    }
    mkldnn = torch.ops.mkldnn
    if torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight"):
        for hint in (1, 4, 32):
            out[f"oneDNN packed (batch hint {hint})"] = (
                lambda w, h=hint: mkldnn._reorder_linear_weight(w, h),
                lambda x, w: mkldnn._linear_pointwise(x, w, None, "none", [], ""),
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6, help="distinct copies of the layer's weights (~0.4 GB each)")
    ap.add_argument("--rounds", type=int, default=5, help="passes per kernel; the best and the median are kept")
    ap.add_argument("--only", default="", help="comma-separated kernel names (substrings) to run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    plain = [
        {k: (torch.randn(s, generator=g) / s[1] ** 0.5).to(torch.bfloat16) for k, s in SHAPES.items()}
        for _ in range(a.layers)
    ]
    nbytes = sum(w.numel() * 2 for layer in plain for w in layer.values())
    x = {k: torch.randn(1, s[1], generator=g).to(torch.bfloat16) for k, s in SHAPES.items()}
    results, bw = [], []
    with torch.inference_mode():
        for name, (prepare, kernel) in candidates().items():
            if a.only and not any(s in name for s in a.only.split(",")):
                continue
            weights = [{k: prepare(w) for k, w in layer.items()} for layer in plain]
            for k in SHAPES:  # same numbers as F.linear (to bf16 rounding of a different summation order)
                ref, got = F.linear(x[k], plain[0][k]).float(), kernel(x[k], weights[0][k]).float()
                torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
            times = []
            for _ in range(a.rounds):
                bw.append(read_bandwidth(1 << 30))
                t = time.perf_counter()
                for layer in weights:
                    for k, w in layer.items():
                        kernel(x[k], w)
                times.append(time.perf_counter() - t)
            del weights
            best, med = min(times), statistics.median(times)
            results.append({"kernel": name, "best_gbs": nbytes / best / 1e9, "median_gbs": nbytes / med / 1e9,
                            "ms_per_7b_token_best": 32 / a.layers * best * 1000})  # fmt: skip
    report = {"threads": a.threads, "weight_bytes": nbytes, "read_gbs_best": max(bw), "read_gbs_median":
              statistics.median(bw), "results": results}  # fmt: skip
    if a.json:
        print(json.dumps(report))
        return
    print(f"{a.threads} thread(s), {nbytes / 1e9:.2f} GB of bf16 weights per pass; read bandwidth (fp32 sum): "
          f"best {max(bw):.1f} GB/s, median {statistics.median(bw):.1f}")  # fmt: skip
    for r in results:
        print(f"  {r['kernel']:34s} best {r['best_gbs']:5.1f} GB/s, median {r['median_gbs']:5.1f} GB/s "
              f"(32 layers: {r['ms_per_7b_token_best']:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
