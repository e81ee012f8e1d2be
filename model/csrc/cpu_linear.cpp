// Linear layers for CPUs with AVX-512 (bf16 weights: AVX512-BF16's vdpbf16ps; int8 weights: fp32 FMAs
// after a sign-extending conversion): y [M, N] = x [M, K] @ W^T.
//
// Decode reads every weight once per step, so at 1-2 rows a step the kernel's job is to stream the
// weights at the memory's speed. W is laid out once, at load, in blocks of 8 output rows:
// [N / 8][K / 32][8][32], so that a block is one sequential run of memory (8 rows x 64 bytes per
// k-step) that the hardware prefetchers follow. Each output is the same fp32 sum in the same order
// (16 lanes accumulated over k in steps of 32, then one fixed horizontal reduction) whatever the
// number of rows and the tiling, so a row's result does not depend on what it is batched with.
// int8 weights use the same layout (32 bytes per row per k-step). Built at run time by torch.utils.cpp_extension (model/cpu_kernels.py); threads from
// at::parallel_for (torch's intra-op pool, so torch.set_num_threads applies).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {
constexpr int64_t RB = 8;   // output rows per block
constexpr int64_t KS = 32;  // input elements per row per k-step (one 64-byte line)

inline float reduce(__m512 acc) { return _mm512_reduce_add_ps(acc); }

// One row of x against one block: the block is read once, front to back.
inline void row_block(const uint16_t* x, const uint16_t* w, int64_t K, c10::BFloat16* y) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += KS) {
    const __m512i xv = _mm512_loadu_si512(x + k);
    for (int r = 0; r < RB; ++r, w += KS)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w), (__m512bh)xv);
  }
  for (int r = 0; r < RB; ++r) y[r] = c10::BFloat16(reduce(acc[r]));
}

// MR rows of x against one block (MR * RB accumulators + MR + 1 live vectors fit the 32 registers
// for MR <= 3): every weight vector loaded serves MR rows.
template <int MR>
inline void rows_block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, c10::BFloat16* y, int64_t ldy) {
  __m512 acc[MR][RB];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += KS) {
    __m512i xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_si512(x + m * ldx + k);
    for (int r = 0; r < RB; ++r, w += KS) {
      const __m512i wv = _mm512_loadu_si512(w);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv, (__m512bh)xv[m]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RB; ++r) y[m * ldy + r] = c10::BFloat16(reduce(acc[m][r]));
}

// int8 weights (W = q * scale[row]) in the same blocked layout, 32 bytes per row per k-step; x in fp32.
// Each row's 32 weights become two fp32 vectors (exact), multiplied into the 16 lanes of its accumulator;
// the scale is applied once, to the finished sum.
template <int MR>
inline void int8_rows_block(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scale, float* y,
                            int64_t ldy) {
  __m512 acc[MR][RB];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += KS) {
    __m512 xl[MR], xh[MR];
    for (int m = 0; m < MR; ++m) {
      xl[m] = _mm512_loadu_ps(x + m * ldx + k);
      xh[m] = _mm512_loadu_ps(x + m * ldx + k + 16);
    }
    for (int r = 0; r < RB; ++r, w += KS) {
      const __m512 wl = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
      const __m512 wh =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_fmadd_ps(wh, xh[m], _mm512_fmadd_ps(wl, xl[m], acc[m][r]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RB; ++r) y[m * ldy + r] = reduce(acc[m][r]) * scale[r];
}

void check_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.is_contiguous(), "a contiguous CPU [out, in] weight");
  TORCH_CHECK(w.size(0) % RB == 0 && w.size(1) % KS == 0, "out features a multiple of 8, in features of 32");
}
}  // namespace

// [N, K] (bf16 or int8) -> the blocked layout (same shape and bytes, rows interleaved per block; the
// rows 8b..8b+7 of the result hold block b, so a slice of whole blocks unblocks on its own).
torch::Tensor block_weight(torch::Tensor w) {
  check_weight(w);
  const int64_t N = w.size(0), K = w.size(1);
  return w.reshape({N / RB, RB, K / KS, KS}).transpose(1, 2).contiguous().reshape({N, K});
}

// block_weight in place, block by block through a buffer of one block (no second copy of the weight:
// a 7B model's int8 weights re-laid out by new tensors left ~4 GB of freed heap behind, measured).
void block_weight_(torch::Tensor w) {
  check_weight(w);
  const int64_t N = w.size(0), K = w.size(1), es = w.element_size();
  auto* base = static_cast<char*>(w.data_ptr());
  at::parallel_for(0, N / RB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<char> tmp(RB * K * es);
    for (int64_t b = b0; b < b1; ++b) {
      char* blk = base + b * RB * K * es;
      std::memcpy(tmp.data(), blk, tmp.size());
      for (int64_t s = 0; s < K / KS; ++s)
        for (int64_t r = 0; r < RB; ++r)
          std::memcpy(blk + (s * RB + r) * KS * es, tmp.data() + (r * K + s * KS) * es, KS * es);
    }
  });
}

// The inverse of block_weight.
torch::Tensor unblock_weight(torch::Tensor wb) {
  check_weight(wb);
  const int64_t N = wb.size(0), K = wb.size(1);
  return wb.reshape({N / RB, K / KS, RB, KS}).transpose(1, 2).contiguous().reshape({N, K});
}

// x [..., K] bf16 @ blocked W [N, K] -> [..., N] bf16 (fp32 accumulation, rounded to nearest even).
torch::Tensor blocked_linear(torch::Tensor x, torch::Tensor wb) {
  check_weight(wb);
  TORCH_CHECK(wb.scalar_type() == at::kBFloat16, "a bf16 weight");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "x: bf16 on the CPU");
  const int64_t K = x.size(-1), N = wb.size(0);
  TORCH_CHECK(wb.size(1) == K && wb.is_contiguous(), "x's last dimension must be the weight's in features");
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  const auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto y = torch::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(wb.data_ptr());
  auto* yp = reinterpret_cast<c10::BFloat16*>(y.data_ptr());
  if (M == 0) return y.reshape(out_shape);
  at::parallel_for(0, N / RB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint16_t* w = wp + b * RB * K;
      c10::BFloat16* yb = yp + b * RB;
      if (M == 1) {
        row_block(xp, w, K, yb);
        continue;
      }
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) rows_block<3>(xp + m * K, K, w, K, yb + m * N, N);
      if (M - m == 2) rows_block<2>(xp + m * K, K, w, K, yb + m * N, N);
      if (M - m == 1) rows_block<1>(xp + m * K, K, w, K, yb + m * N, N);
    }
  });
  return y.reshape(out_shape);
}

// x [..., K] (any float dtype) @ (q * scales[:, None])^T, q int8 laid out by block_weight -> [..., N]
// float32 (the caller casts). Up to 2 rows of x share each converted weight vector.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor qb, torch::Tensor scales) {
  check_weight(qb);
  TORCH_CHECK(qb.scalar_type() == at::kChar, "an int8 weight");
  const int64_t K = x.size(-1), N = qb.size(0);
  TORCH_CHECK(qb.size(1) == K, "x's last dimension must be the weight's in features");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N, "N float32 scales");
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  const auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  auto y = torch::empty({M, N}, x2.options());
  if (M == 0) return y.reshape(out_shape);
  const float* xp = x2.data_ptr<float>();
  const int8_t* wp = qb.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / RB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* w = wp + b * RB * K;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) int8_rows_block<2>(xp + m * K, K, w, K, sp + b * RB, yp + m * N + b * RB, N);
      if (m < M) int8_rows_block<1>(xp + m * K, K, w, K, sp + b * RB, yp + m * N + b * RB, N);
    }
  });
  return y.reshape(out_shape);
}

// A read-bandwidth probe: the sum of a float32 buffer with four independent AVX-512 accumulators per
// thread (torch's own sum reads at ~60 % of this on the machines measured; see bench --bandwidth).
double read_probe(torch::Tensor buf) {
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous() && buf.numel() % 64 == 0, "float32, 64n");
  const auto* p = buf.data_ptr<float>();
  const int64_t n = buf.numel() / 64;  // 4 vectors a step
  std::vector<double> part(at::get_num_threads() + 1, 0.0);
  at::parallel_for(0, n, 1024, [&](int64_t a, int64_t b) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    for (int64_t i = a; i < b; ++i) {
      const float* q = p + i * 64;
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(q));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(q + 16));
      s2 = _mm512_add_ps(s2, _mm512_loadu_ps(q + 32));
      s3 = _mm512_add_ps(s3, _mm512_loadu_ps(q + 48));
    }
    part[at::get_thread_num()] += reduce(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_probe", &read_probe, "sum of a float32 buffer (a read-bandwidth probe)");
  m.def("block_weight", &block_weight, "[out, in] bf16 weight -> the kernel's blocked layout");
  m.def("block_weight_", &block_weight_, "block_weight in place");
  m.def("unblock_weight", &unblock_weight, "the inverse of block_weight");
  m.def("blocked_linear", &blocked_linear, "x [..., in] bf16 @ blocked weight^T -> [..., out] bf16");
  m.def("int8_linear", &int8_linear, "x [..., in] @ (blocked int8 weight * scales)^T -> [..., out] float32");
}
