"""What a bf16 decode step spends outside its linears, on the CPU.

attention: the engine's one-query attention kernel (decode_attention) against what bf16 decode ran
  before it (SDPA on K and V upcast to fp32), Mistral-7B heads (32 query heads, 8 kv heads, dim 128),
  one row, several cache lengths; interleaved rounds in one process, medians and ranges. Each call
  runs over --layers separate caches in turn (32 by default, as a 7B step does, so each finds its
  cache cold as in a real step; --layers 1 times one warm cache) and reports the time per layer.

    python scripts/decode_glue.py attention --keys 3,128,1024,4096

step: ms per decode step of a model directory (a few layers of the 7B shape are enough) at a short
  and a long context, eager; run it from two checkouts in turn to compare them (the cache is filled
  by chunked prefill of random tokens first).

    python scripts/decode_glue.py step --model DIR --contexts 64,1024
"""

from __future__ import annotations

import argparse
import json
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


def timed(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


Pair = tuple[Callable[[], object], Callable[[], object], Callable[[], tuple[torch.Tensor, torch.Tensor]]]


def _pair(k: object, keys: int, layers: int, g: torch.Generator) -> Pair:
    """Before and after for one row of Mistral-7B heads over `keys` cached keys, each call over all
    `layers` caches in turn (as a decode step does: the caches are cold once the model is larger than
    the CPU's caches); and the first layer's outputs, to check the kernel against the reference."""
    bf = torch.bfloat16
    q = torch.randn(1, 1, 32, 128, generator=g).to(bf)
    caches = [
        tuple(torch.randn(1, keys + 1, 8, 128, generator=g).to(bf)[:, :keys] for _ in range(2)) for _ in range(layers)
    ]
    mask = torch.ones(1, 1, 1, keys, dtype=torch.bool)
    qt = q.transpose(1, 2)
    flat = mask.view(1, keys)

    def up(kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        kt, vt = kc.transpose(1, 2), vc.transpose(1, 2)
        return F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), attn_mask=mask, enable_gqa=True)

    def upcast() -> None:
        for kc, vc in caches:
            up(kc, vc)

    def kernel() -> None:
        for kc, vc in caches:
            k.decode_attention(q.squeeze(1), kc, vc, flat)  # type: ignore[attr-defined]

    def first() -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = caches[0]
        return up(kc, vc).transpose(1, 2).squeeze(1), k.decode_attention(q.squeeze(1), kc, vc, flat)  # type: ignore[attr-defined]

    return upcast, kernel, first


def attention(a: argparse.Namespace) -> None:
    from model.cpu_kernels import blocked_kernels, blocked_kernels_error

    k = blocked_kernels(log=True)
    if k is None:
        raise SystemExit(f"the engine's kernels cannot be built here: {blocked_kernels_error()}")
    g = torch.Generator().manual_seed(0)
    rows = []
    for keys in [int(x) for x in a.keys.split(",")]:
        upcast, kernel, first = _pair(k, keys, a.layers, g)
        ref, got = first()
        assert (got.float() - ref).abs().max().item() <= 2.0**-7 * ref.abs().max().item() + 1e-4
        n = max(3, 20000 // (keys * a.layers))
        res: dict[str, list[float]] = {"sdpa, K and V upcast to fp32 (before)": [], "decode_attention": []}
        for _ in range(a.rounds):
            res["sdpa, K and V upcast to fp32 (before)"].append(timed(upcast, n) / a.layers)
            res["decode_attention"].append(timed(kernel, n) / a.layers)
        rows.append((keys, res))
    print("| keys | " + " | ".join(rows[0][1]) + " | speed-up (median) |")
    print("|---|---|---|---|")
    for keys, res in rows:
        cells = [f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}] us" for v in res.values()]
        before, after = (statistics.median(v) for v in res.values())
        print(f"| {keys} | " + " | ".join(cells) + f" | {before / after:.1f}x |")


def step(a: argparse.Namespace) -> None:
    from model.checkpoint import load_stage
    from model.cpu_kernels import prepare_cpu_linears
    from model.layers import fuse_projections

    stage = load_stage(a.model, dtype=torch.bfloat16)
    fuse_projections(stage)
    prepare_cpu_linears(stage)
    vocab = stage.args.vocab_size
    res: dict[int, list[float]] = {}
    with torch.no_grad():
        caches = {}
        for n in [int(x) for x in a.contexts.split(",")]:
            cache = stage.make_cache(1, max(n + 8 * a.rounds, 64))
            for s in range(0, n, 256):
                m = min(256, n - s)
                stage(torch.randint(0, vocab, (1, m)), torch.arange(s, s + m)[None], cache)
            caches[n] = cache
        for r in range(a.rounds):
            for n, cache in caches.items():
                t0 = time.perf_counter()
                for i in range(8):
                    stage(torch.tensor([[5]]), torch.tensor([[n + 8 * r + i]]), cache)
                res.setdefault(n, []).append((time.perf_counter() - t0) / 8 * 1e3)
    print(json.dumps({f"context {n}: ms/step": round(statistics.median(v), 2) for n, v in res.items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    at = sub.add_parser("attention")
    at.add_argument("--keys", default="3,128,1024,4096")
    at.add_argument("--rounds", type=int, default=5)
    at.add_argument(
        "--layers",
        type=int,
        default=32,
        help="caches cycled per call, as a step of that many layers reads them "
        "(32: the 7B's; 1: one cache, warm in the CPU's caches)",
    )
    st = sub.add_parser("step")
    st.add_argument("--model", required=True)
    st.add_argument("--contexts", default="64,1024")
    st.add_argument("--rounds", type=int, default=5)
    for p in (at, st):
        p.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    attention(a) if a.what == "attention" else step(a)


if __name__ == "__main__":
    main()
