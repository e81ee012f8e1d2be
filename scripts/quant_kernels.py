"""The quantized CPU linears against each other at the rows a step carries (issue 11): one 7B layer's
linears (fused shapes: wqkv, wo, w13, w2), several distinct copies so the caches are left behind,
through each kernel, interleaved in rounds; prints ms per 7B decode step's linears (32 layers) and
GB/s of weight bytes read, median and best over the rounds.

    OMP_WAIT_POLICY=PASSIVE python scripts/quant_kernels.py --threads 2 --rows 1,2,4,8,16 --rounds 5

Kernels (QuantLinear.kernel): int4blk (the engine's: int8 activations x int4 weights, AVX512-VNNI),
int4cpu (PyTorch's _weight_int4pack_mm_for_cpu, bf16 activations), int8blk (the engine's int8),
int8grp (the same kernel with an fp16 scale per --group inputs, GGUF Q8_0's layout at 32),
bf16 (the engine's AVX512-BF16 kernel, --cpu_linear blocked).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

# This checkout's engine, not whichever one `pip install -e` pointed at: comparisons run this script
# from two checkouts in turn.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.cpu_kernels import block_linears, blocked_kernels, int_kernels
from model.quant import QuantLinear, QuantSpec, quantize

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}  # [out, in]


def build(kind: str, layers: int, group: int) -> list[nn.Module]:
    g = torch.Generator().manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        for n, k in SHAPES.values():
            w = torch.randn(n, k, generator=g) / k**0.5
            if kind == "bf16":
                lin = nn.Linear(k, n, bias=False).to(torch.bfloat16)
                lin.weight.data.copy_(w)
                block_linears(lin)
                mods.append(lin)
                continue
            specs = {"int8blk": QuantSpec("int8"), "int8grp": QuantSpec("int8", group)}
            spec = specs.get(kind, QuantSpec("int4", group))
            mod = QuantLinear.from_tensors(quantize(w, spec), spec, k)
            mod.prepare(own_kernels=kind != "int4cpu")
            assert mod.kernel == kind.replace("int8grp", "int8blk"), (mod.kernel, kind)
            mods.append(mod)
    return mods


def nbytes(mods: list[nn.Module]) -> int:
    return sum(m.nbytes() if isinstance(m, QuantLinear) else m.weight.numel() * 2 for m in mods)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--kernels", default="int4blk,int4cpu,int8blk,bf16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if blocked_kernels(log=True) is None:
        raise SystemExit("the engine's kernels cannot be built here")
    kinds = a.kernels.split(",")
    if int_kernels() is None and any(k.endswith("blk") for k in kinds):
        kinds = [k for k in kinds if not k.endswith("blk")]
        print("int8blk / int4blk left out: the engine's int kernels need AVX512-VNNI")
    sets = {k: build(k, a.layers, a.group) for k in kinds}
    rows = [int(r) for r in a.rows.split(",")]
    times: dict[tuple[str, int], list[float]] = {(k, m): [] for k in kinds for m in rows}
    xs = {m: {k: torch.randn(m, k).to(torch.bfloat16) for k in (4096, 14336)} for m in rows}
    with torch.inference_mode():
        for _ in range(a.rounds):
            for m in rows:
                for kind in kinds:
                    t0 = time.perf_counter()
                    for mod in sets[kind]:
                        mod(xs[m][mod.in_features])
                    times[(kind, m)].append((time.perf_counter() - t0) / a.layers)
    print(f"ms per 7B step's linears (32 layers), median [best] of {a.rounds} rounds; GB/s of weight bytes")
    print(f"{'rows':>4} " + " ".join(f"{k:>22}" for k in kinds))
    for m in rows:
        cells = []
        for kind in kinds:
            t = times[(kind, m)]
            per_layer = nbytes(sets[kind]) / a.layers
            cells.append(f"{32e3 * statistics.median(t):7.1f} [{32e3 * min(t):6.1f}] {per_layer / min(t) / 1e9:4.1f}")
        print(f"{m:>4} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
