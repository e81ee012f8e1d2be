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
    out["inductor max-autotune, frozen weight (C++ GEMM template)"] = (inductor_linear, lambda x, m: m(x))
    custom = avx512_bf16_gemv()
    if custom is not None:
        out["hand-written AVX512-BF16, 8 rows a step (probe only)"] = (lambda w: w, lambda x, w: custom(x, w))
    return out


AVX512_BF16_GEMV = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

// y [M, N] = x [M, K] @ w [N, K]^T for M <= 4, bf16 in, fp32 accumulation (vdpbf16ps), bf16 out.
// Weights are read once, row after row as stored; 8 rows share each 32-element slice of x.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.is_contiguous(), "x [M, K], w [N, K] contiguous");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 32 == 0 && M <= 4, "K a multiple of 32, M <= 4");
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  constexpr int R = 8;
  at::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const int rows = (int)std::min<int64_t>(R, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
          __m512i xv = _mm512_loadu_si512(xp + m * K + k);
          for (int r = 0; r < rows; ++r) {
            __m512i wv = _mm512_loadu_si512(wp + (n0 + r) * K + k);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)xv);
          }
        }
        for (int r = 0; r < rows; ++r) yp[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r]);
      }
    }
  });
  return y.to(x.scalar_type());
}
"""


def avx512_bf16_gemv() -> Kernel | None:
    """A plain AVX512-BF16 GEMV built with torch's cpp_extension (needs g++ and a CPU with
    avx512_bf16); None, with the reason printed, where it cannot be built. A probe of what a
    hand-written kernel reaches here, not an engine path."""
    try:
        if "avx512_bf16" not in open("/proc/cpuinfo").read():
            print("hand-written AVX512-BF16 GEMV: skipped, this CPU has no avx512_bf16")
            return None
        from torch.utils.cpp_extension import load_inline

        mod = load_inline("gemv_probe_avx512_bf16", cpp_sources=[AVX512_BF16_GEMV], functions=["gemv_bf16"],
                          extra_cflags=["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"],
                          extra_ldflags=["-fopenmp"])  # fmt: skip
        return mod.gemv_bf16  # type: ignore[no-any-return]
    except Exception as e:  # no compiler, no headers: the probe goes on without it
        print(f"hand-written AVX512-BF16 GEMV: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None


def inductor_linear(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """F.linear with a constant weight through torch.compile(mode="max-autotune") with freezing, which
    lets inductor pick its C++ GEMM template (AVX512-BF16 micro-kernels, its own weight packing)
    where that measures faster than oneDNN. Compiled (and autotuned) here, once per weight."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype).eval()
    mod.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    compiled = torch.compile(mod, mode="max-autotune", dynamic=False)
    compiled(torch.zeros(1, w.shape[1], dtype=w.dtype))
    return compiled


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
