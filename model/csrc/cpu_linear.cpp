// Linear layers for CPUs with AVX-512 (bf16 weights: AVX512-BF16's vdpbf16ps; int8 and int4 weights:
// AVX512-VNNI's vpdpbusd on quantized activations): y [M, N] = x [M, K] @ W^T.
//
// Decode reads every weight once per step, so at 1-2 rows a step the kernel's job is to stream the
// weights at the memory's speed. A bf16 W is laid out once, at load, in blocks of 8 output rows:
// [N / 8][K / 32][8][32], so that a block is one sequential run of memory (8 rows x 64 bytes per
// k-step) that the hardware prefetchers follow. Each output is the same fp32 sum in the same order
// (16 lanes accumulated over k in steps of 32, then one fixed horizontal reduction) whatever the
// number of rows and the tiling, so a row's result does not depend on what it is batched with.
// Built at run time by torch.utils.cpp_extension (model/cpu_kernels.py); threads from
// at::parallel_for (torch's intra-op pool, so torch.set_num_threads applies).
//
// Also, in both builds: attention for one query per row (decode) over the bf16 KV cache (decode_attention).
//
// Two builds of this one file, chosen by the CPU: with AVX-512 (-mavx512bf16 -mavx512vnni ...) every
// kernel below; with AVX2 and FMA only (AMD Zen 2/3, Intel client CPUs before AVX-512) the bf16 kernel
// on the same blocked layout (bf16 -> fp32 by a shift and a mask, then FMAs) and the read probe; the
// int8 and int4 kernels need VNNI and are left out (model/quant.py then takes PyTorch's). The module's
// ISA attribute says which build it is.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define MP_AVX512 1
#elif !(defined(__AVX2__) && defined(__FMA__))
#error "cpu_linear.cpp needs AVX-512 (bf16, vnni) or AVX2 with FMA"
#endif

namespace {
constexpr int64_t RB = 8;   // output rows per block
constexpr int64_t KS = 32;  // input elements per row per k-step (one 64-byte line)
constexpr int64_t STREAMS = 3;  // AVX-512: blocks read side by side at one row (3 x 8 accumulators)
constexpr int64_t CHUNK = 16;   // groups of blocks a thread takes at a time at one row

#ifdef MP_AVX512
inline float reduce(__m512 acc) { return _mm512_reduce_add_ps(acc); }

// One row of x against S consecutive blocks, read side by side: S sequential streams in flight
// (one stream per thread left the 2 cores at ~85 % of the read bandwidth; three reach it, measured
// in docs/benchmarks.md); every row's sum is the same as with one block at a time.
template <int S>
inline void row_blocks(const uint16_t* x, const uint16_t* w, int64_t K, c10::BFloat16* y) {
  __m512 acc[S][RB];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < RB; ++r) acc[s][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += KS) {
    const __m512i xv = _mm512_loadu_si512(x + k);
    for (int r = 0; r < RB; ++r)
      for (int s = 0; s < S; ++s)
        acc[s][r] = _mm512_dpbf16_ps(acc[s][r], (__m512bh)_mm512_loadu_si512(w + s * RB * K + k * RB + r * KS),
                                     (__m512bh)xv);
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < RB; ++r) y[s * RB + r] = c10::BFloat16(reduce(acc[s][r]));
}
static_assert(STREAMS == 3, "blocked_linear's one-row dispatch handles groups of 1 to 3 blocks");

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

#else  // AVX2 + FMA
inline float reduce(__m256 acc) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// x [K] bf16 -> fp32 with each 16 inputs split into their 8 even then 8 odd ones: a 32-byte load of 16
// bf16 weights gives the even ones as fp32 by a shift left (w << 16) and the odd ones by a mask (w &
// 0xFFFF0000), with no shuffle, and each meets its own 8 inputs.
void split_x(const uint16_t* x, int64_t K, float* xf) {
  for (int64_t k = 0; k < K; k += 16)
    for (int j = 0; j < 8; ++j) {
      const uint32_t e = static_cast<uint32_t>(x[k + 2 * j]) << 16, o = static_cast<uint32_t>(x[k + 2 * j + 1]) << 16;
      std::memcpy(xf + k + j, &e, 4);
      std::memcpy(xf + k + 8 + j, &o, 4);
    }
}

// One row of x (split_x's layout) against S consecutive blocks read side by side (S streams in
// flight): one accumulator per output row, each the same sum in the same order whatever S and the
// batch. (S * 8 accumulators exceed AVX2's 16 registers at S = 2: the compiler keeps some in L1,
// which the memory-bound loop absorbs at 2 and no longer at 3 or 4.)
template <int S>
inline void row_blocks(const float* xf, const uint16_t* w, int64_t K, c10::BFloat16* y) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[S][RB];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < RB; ++r) acc[s][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += KS) {
    const __m256 x0 = _mm256_loadu_ps(xf + k), x1 = _mm256_loadu_ps(xf + k + 8);
    const __m256 x2 = _mm256_loadu_ps(xf + k + 16), x3 = _mm256_loadu_ps(xf + k + 24);
    for (int r = 0; r < RB; ++r)
      for (int s = 0; s < S; ++s) {
        const uint16_t* wr = w + s * RB * K + k * RB + r * KS;
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 16));
        __m256 t = acc[s][r];
        t = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), x0, t);
        t = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, hi)), x1, t);
        t = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), x2, t);
        acc[s][r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(b, hi)), x3, t);
      }
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < RB; ++r) y[s * RB + r] = c10::BFloat16(reduce(acc[s][r]));
}
constexpr int64_t STREAMS_AVX2 = 2;  // 1.10x one stream (29.3 vs 26.6 GB/s, in one process); 3 and 4 spill too much
#endif

void check_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.is_contiguous(), "a contiguous CPU [out, in] weight");
  TORCH_CHECK(w.size(0) % RB == 0 && w.size(1) % KS == 0, "out features a multiple of 8, in features of 32");
}
}  // namespace

// [N, K] bf16 -> the blocked layout (same shape and bytes, rows interleaved per block; the
// rows 8b..8b+7 of the result hold block b, so a slice of whole blocks unblocks on its own).
torch::Tensor block_weight(torch::Tensor w) {
  check_weight(w);
  const int64_t N = w.size(0), K = w.size(1);
  return w.reshape({N / RB, RB, K / KS, KS}).transpose(1, 2).contiguous().reshape({N, K});
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
  const int64_t nb = N / RB;
#ifndef MP_AVX512
  // Threads take CHUNK units at a time from a shared counter (as the AVX-512 path at one row): at one
  // row a unit is STREAMS_AVX2 blocks read side by side; at several, one block, which meets every row
  // of x while it is in cache.
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m) split_x(xp + m * K, K, xf.data() + m * K);
  std::atomic<int64_t> next{0};
  if (M == 1) {
    const int64_t S = STREAMS_AVX2, groups = (nb + S - 1) / S;
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t g0; (g0 = next.fetch_add(CHUNK, std::memory_order_relaxed)) < groups;)
        for (int64_t g = g0; g < std::min(groups, g0 + CHUNK); ++g) {
          const int64_t b = g * S, left = std::min(S, nb - b);
          const uint16_t* w = wp + b * RB * K;
          static_assert(STREAMS_AVX2 == 2, "the one-row dispatch handles groups of 1 or 2 blocks");
          if (left == 2) row_blocks<2>(xf.data(), w, K, yp + b * RB);
          else row_blocks<1>(xf.data(), w, K, yp + b * RB);
        }
    });
    return y.reshape(out_shape);
  }
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t b0; (b0 = next.fetch_add(CHUNK, std::memory_order_relaxed)) < nb;)
      for (int64_t b = b0; b < std::min(nb, b0 + CHUNK); ++b)
        for (int64_t m = 0; m < M; ++m) row_blocks<1>(xf.data() + m * K, wp + b * RB * K, K, yp + m * N + b * RB);
  });
  return y.reshape(out_shape);
#else
  if (M == 1) {
    // Threads take CHUNK groups of STREAMS blocks at a time from a shared counter, so a thread that
    // the host slows down does less of the matrix instead of holding the others up at the end.
    const int64_t groups = (nb + STREAMS - 1) / STREAMS;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t g0; (g0 = next.fetch_add(CHUNK, std::memory_order_relaxed)) < groups;) {
        for (int64_t g = g0; g < std::min(groups, g0 + CHUNK); ++g) {
          const int64_t b = g * STREAMS, left = std::min(STREAMS, nb - b);
          const uint16_t* w = wp + b * RB * K;
          if (left == 3) row_blocks<3>(xp, w, K, yp + b * RB);
          else if (left == 2) row_blocks<2>(xp, w, K, yp + b * RB);
          else row_blocks<1>(xp, w, K, yp + b * RB);
        }
      }
    });
    return y.reshape(out_shape);
  }
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint16_t* w = wp + b * RB * K;
      c10::BFloat16* yb = yp + b * RB;
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) rows_block<3>(xp + m * K, K, w, K, yb + m * N, N);
      if (M - m == 2) rows_block<2>(xp + m * K, K, w, K, yb + m * N, N);
      if (M - m == 1) rows_block<1>(xp + m * K, K, w, K, yb + m * N, N);
    }
  });
  return y.reshape(out_shape);
#endif
}

#ifdef MP_AVX512

namespace {
// x quantized per chunk of C inputs (C a multiple of 16): sx = amax / levels, q = round(x * (levels /
// amax)) in fp32, rounded to nearest even (as torch.round), and the chunk's sum of q. levels = 127: q
// as int8 in lo. levels = 8191 (14 bits): q = 128 hi + lo with lo in [-64, 63] and hi in [-64, 64], both
// int8, so that two vpdpbusd against unsigned bytes give the product with 14-bit activations.
void quantize_x(const float* x, int64_t chunks, int64_t C, float levels, int8_t* lo, int8_t* hi, float* sx,
                int32_t* qsum) {
  for (int64_t i = 0; i < chunks; ++i) {
    const float* v = x + i * C;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < C; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(v + k)));
    const float amax = _mm512_reduce_max_ps(mx);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? levels / amax : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < C; k += 16) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + k), inv));
      sum = _mm512_add_epi32(sum, q);
      if (hi == nullptr) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + i * C + k), _mm512_cvtepi32_epi8(q));
      } else {
        const __m512i b = _mm512_sub_epi32(
            _mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(64)), _mm512_set1_epi32(127)), _mm512_set1_epi32(64));
        const __m512i a = _mm512_srai_epi32(_mm512_sub_epi32(q, b), 7);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + i * C + k), _mm512_cvtepi32_epi8(b));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + i * C + k), _mm512_cvtepi32_epi8(a));
      }
    }
    sx[i] = amax / levels;
    qsum[i] = _mm512_reduce_add_epi32(sum);
  }
}
}  // namespace

// ---- int4 (group-wise, zero point): w = q * scale[n, g] + min[n, g], q in 0..15 ----------------------
//
// llama.cpp's route, which a weight-only kernel cannot match on a CPU: x is quantized too, to int8 per
// group of the weight's group size (x ~ sx[g] * qx, |qx| <= 127), so a group's dot product is integer
// work, AVX512-VNNI's vpdpbusd (64 unsigned weight bytes x 64 signed x bytes into 16 int32 lanes), and
//   y[n] = sum_g sx[g] * (scale[n, g] * dot(q[n, g], qx[g]) + min[n, g] * sum(qx[g]))
// = W x^ for x^ = sx * qx, as llama.cpp's Q4_1 x Q8_1 dot product. Both terms on x^: the error is then
// sum_k w_k (x^_k - x_k), small where the weights are; an exact float sum(x) in the min term instead
// leaves sum_k (w_k - min) (x^_k - x_k), which in a group with one outlier weight (every other weight
// near min or max) adds up over the whole group (7-14x larger, measured).
//
// Layout (int4_block_weight in model/quant.py): blocks of 16 output rows, one row per 32-bit lane. Per
// group, per 32 inputs, four 64-byte vectors c = 0..3: lane r (row r), byte b holds input 4c + b in its
// low nibble and input 16 + 4c + b in its high one; the group's 16 scales and 16 mins (fp16) in a
// second stream. A vpdpbusd then adds 4 products into each row's own lane, so the per-group float work
// is one conversion and two FMAs for 16 rows (the earlier layout, 4 rows x 16 bytes a vector, needed a
// permute and a conversion per vector: 1.27x slower in cache at one row, 1.4x at 2-4). The high nibbles
// go in unshifted (v & 0xF0 = 16 q): that lane's sum is exactly 16 times the dot product, shifted back
// once per group.
namespace {
constexpr int64_t LANES = 16;  // output rows per int4 and int8 block: one row per 32-bit lane of a vector

template <int MR>
inline void int4_rows_block(const int8_t* qx, const float* sx, const float* xs, int64_t K, int64_t G,
                            const uint8_t* w, const uint16_t* sm, float* y, int64_t ldy) {
  const int64_t ng = K / G, sub = G / 32;
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
  __m512 facc[MR], macc[MR];
  for (int m = 0; m < MR; ++m) facc[m] = macc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g, sm += 2 * LANES) {
    __m512i alo[MR], ahi[MR];
    for (int m = 0; m < MR; ++m) alo[m] = ahi[m] = _mm512_setzero_si512();
    for (int64_t s = 0; s < sub; ++s) {
      const int64_t k0 = g * G + s * 32;
      for (int c = 0; c < 4; ++c, w += 64) {
        const __m512i v = _mm512_loadu_si512(w);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(v, high);
        for (int m = 0; m < MR; ++m) {
          int32_t xl, xh;
          std::memcpy(&xl, qx + m * K + k0 + 4 * c, 4);
          std::memcpy(&xh, qx + m * K + k0 + 16 + 4 * c, 4);
          alo[m] = _mm512_dpbusd_epi32(alo[m], lo, _mm512_set1_epi32(xl));
          ahi[m] = _mm512_dpbusd_epi32(ahi[m], hi, _mm512_set1_epi32(xh));
        }
      }
    }
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm + LANES)));
    for (int m = 0; m < MR; ++m) {
      const __m512i dot = _mm512_add_epi32(alo[m], _mm512_srai_epi32(ahi[m], 4));
      facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, _mm512_set1_ps(sx[m * ng + g])), facc[m]);
      macc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[m * ng + g]), macc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(y + m * ldy, _mm512_add_ps(facc[m], macc[m]));
}
}  // namespace

// x [..., K] (any float dtype) @ W^T for an int4 weight in the layout above: qb uint8 [N, K / 2],
// sm fp16 [N / 16, K / G, 2, 16] (scales, then mins) -> [..., N] float32. Rows of x in pairs share each
// unpacked weight vector; a row's result does not depend on the others.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor qb, torch::Tensor sm, int64_t G) {
  TORCH_CHECK(qb.dim() == 2 && qb.scalar_type() == at::kByte && qb.is_contiguous() && qb.device().is_cpu(),
              "a contiguous uint8 [out, in / 2] weight on the CPU");
  const int64_t K = x.size(-1), N = qb.size(0);
  TORCH_CHECK(G % 32 == 0 && K % G == 0 && N % LANES == 0 && qb.size(1) * 2 == K,
              "group a multiple of 32 dividing in features, out features a multiple of 16");
  TORCH_CHECK(sm.scalar_type() == at::kHalf && sm.is_contiguous() && sm.numel() == 2 * N * (K / G),
              "fp16 scales and mins [N / 16, K / G, 2, 16]");
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  const auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0), ng = K / G;
  auto y = torch::empty({M, N}, x2.options());
  if (M == 0) return y.reshape(out_shape);
  // x to int8 per group: sx = amax / 127, qx = round(x / sx); and sx * sum(qx), the sum of x^.
  std::vector<int8_t> qx(M * K);
  std::vector<float> sx(M * ng), xs(M * ng);
  std::vector<int32_t> qsum(M * ng);
  quantize_x(x2.data_ptr<float>(), M * ng, G, 127.f, qx.data(), nullptr, sx.data(), qsum.data());
  for (int64_t i = 0; i < M * ng; ++i) xs[i] = sx[i] * static_cast<float>(qsum[i]);
  const uint8_t* wp = qb.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(sm.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / LANES, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = wp + b * LANES * K / 2;
      const uint16_t* s = sp + b * 2 * LANES * ng;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2)
        int4_rows_block<2>(qx.data() + m * K, sx.data() + m * ng, xs.data() + m * ng, K, G, w, s,
                           yp + m * N + b * LANES, N);
      if (m < M)
        int4_rows_block<1>(qx.data() + m * K, sx.data() + m * ng, xs.data() + m * ng, K, G, w, s,
                           yp + m * N + b * LANES, N);
    }
  });
  return y.reshape(out_shape);
}


// ---- int8 (per output channel, or group-wise: an fp16 scale per G inputs) --------------------------
//
// Weight-only in effect: x is quantized to 14 bits per chunk of C inputs (C = min(G, 128), or 128 / 64 /
// 32 per channel), x ~ sx * qx with |qx| <= 8191, whose rounding (2^-14 of the chunk's largest entry) is
// far below bf16's (2^-9 of each entry). qx = 128 a + b with a, b in int8, and the weight is stored
// offset to unsigned bytes (w + 128), so a chunk's dot product is two AVX512-VNNI vpdpbusd per 64 weight
// bytes, exact in int32:  sum w qx = 128 sum (w+128) a + sum (w+128) b - 128 sum qx.
// (Converting the int8 weights to fp32 for FMAs, the earlier kernel, spent 6 vector instructions per 32
// weights: 29 -> 111 GB/s in cache at one row, scripts/quant_kernels.py.) Layout (int8_block_ in place):
// blocks of 16 output rows, one row per 32-bit lane; per 4 inputs one 64-byte vector, lane r holding
// inputs 4c..4c+3 of row r; out features padded to 16 with zero rows. Scales: per channel float32 [Np];
// group-wise fp16 [Np / 16, K / G, 16].
namespace {
template <int MR, bool GROUPED, int CH>
inline void int8_rows_block(const int8_t* qa, const int8_t* qb8, const float* sx, const int32_t* sq, int64_t K,
                            int64_t C, int64_t G, const uint8_t* w, const uint16_t* gsc, const float* rsc,
                            float* y, int64_t ldy, int64_t nvalid) {
  const int64_t nc = K / C;
  __m512 facc[MR];
  for (int m = 0; m < MR; ++m) facc[m] = _mm512_setzero_ps();
  __m512 sc = _mm512_set1_ps(1.f);
  for (int64_t c = 0; c < nc; ++c) {
    if (GROUPED && (c * C) % G == 0) {
      sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gsc)));
      gsc += LANES;
    }
    // CH chains each (C / 32: a dpbusd's latency is several of its issue slots, and short chunks
    // overlap with the next one anyway)
    __m512i A[MR][CH], B[MR][CH];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < CH; ++j) A[m][j] = B[m][j] = _mm512_setzero_si512();
    const int64_t k0 = c * C;
    for (int64_t k = 0; k < C; k += 4 * CH) {
      for (int j = 0; j < CH; ++j, w += 64) {
        const __m512i v = _mm512_loadu_si512(w);
        for (int m = 0; m < MR; ++m) {
          int32_t xa, xb;
          std::memcpy(&xa, qa + m * K + k0 + k + 4 * j, 4);
          std::memcpy(&xb, qb8 + m * K + k0 + k + 4 * j, 4);
          A[m][j] = _mm512_dpbusd_epi32(A[m][j], v, _mm512_set1_epi32(xa));
          B[m][j] = _mm512_dpbusd_epi32(B[m][j], v, _mm512_set1_epi32(xb));
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      __m512i a = A[m][0], b = B[m][0];
      for (int j = 1; j < CH; ++j) {
        a = _mm512_add_epi32(a, A[m][j]);
        b = _mm512_add_epi32(b, B[m][j]);
      }
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(a, 7), b),
                                           _mm512_set1_epi32(128 * sq[m * nc + c]));
      const __m512 f = _mm512_cvtepi32_ps(dot);
      const __m512 s = _mm512_set1_ps(sx[m * nc + c]);
      facc[m] = _mm512_fmadd_ps(f, GROUPED ? _mm512_mul_ps(sc, s) : s, facc[m]);
    }
  }
  const __mmask16 mask = nvalid >= LANES ? 0xFFFF : static_cast<__mmask16>((1u << nvalid) - 1);
  for (int m = 0; m < MR; ++m) {
    __m512 r = facc[m];
    if (!GROUPED) r = _mm512_mul_ps(r, _mm512_maskz_loadu_ps(mask, rsc));
    _mm512_mask_storeu_ps(y + m * ldy, mask, r);
  }
}
}  // namespace

// x [..., K] (any float dtype) @ W^T for an int8 weight in the layout above (qw [Np, K], n <= Np real
// out features) -> [..., n] float32. Rows of x in pairs share each weight vector; a row's result does not
// depend on the others.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, int64_t G, int64_t n) {
  const int64_t K = x.size(-1), Np = qw.size(0);
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == at::kChar && qw.is_contiguous() && qw.device().is_cpu(),
              "an int8 weight, contiguous on the CPU");
  TORCH_CHECK(Np % LANES == 0 && n <= Np && Np - n < LANES && qw.size(1) == K && K % 32 == 0,
              "x's last dimension must be the weight's in features (a multiple of 32); rows padded to 16");
  if (G == 0) {
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == Np,
                "Np float32 scales");
  } else {
    TORCH_CHECK(G % 32 == 0 && K % G == 0, "a group of 32n inputs dividing in features");
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == Np * (K / G),
                "fp16 scales [Np / 16, K / G, 16]");
  }
  const int64_t C = G ? std::min<int64_t>(G, 128) : (K % 128 == 0 ? 128 : K % 64 == 0 ? 64 : 32);
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  const auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0), nc = K / C, ng = G ? K / G : 0;
  auto y = torch::empty({M, n}, x2.options());
  if (M == 0) return y.reshape(out_shape);
  std::vector<int8_t> qa(M * K), qb8(M * K);
  std::vector<float> sx(M * nc);
  std::vector<int32_t> sq(M * nc);
  quantize_x(x2.data_ptr<float>(), M * nc, C, 8191.f, qb8.data(), qa.data(), sx.data(), sq.data());
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(qw.data_ptr());
  const auto* gp = G ? reinterpret_cast<const uint16_t*>(scales.data_ptr()) : nullptr;
  const float* rp = G ? nullptr : scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, Np / LANES, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = wp + b * LANES * K;
      const int64_t nv = std::min<int64_t>(LANES, n - b * LANES);
      const uint16_t* gs = G ? gp + b * ng * LANES : nullptr;
      const float* rs = G ? nullptr : rp + b * LANES;
      auto block = [&](auto mr, auto grouped, int64_t m) {
        constexpr int MR = decltype(mr)::value;
        constexpr bool GR = decltype(grouped)::value;
        const int8_t *a = qa.data() + m * K, *lo = qb8.data() + m * K;
        const float* s = sx.data() + m * nc;
        const int32_t* q = sq.data() + m * nc;
        float* out = yp + m * n + b * LANES;
        if (C == 32) int8_rows_block<MR, GR, 1>(a, lo, s, q, K, C, G, w, gs, rs, out, n, nv);
        else if (C == 64) int8_rows_block<MR, GR, 2>(a, lo, s, q, K, C, G, w, gs, rs, out, n, nv);
        else int8_rows_block<MR, GR, 4>(a, lo, s, q, K, C, G, w, gs, rs, out, n, nv);
      };
      auto rows = [&](auto grouped) {  // x's rows in pairs, then the odd one
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) block(std::integral_constant<int, 2>(), grouped, m);
        if (m < M) block(std::integral_constant<int, 1>(), grouped, m);
      };
      if (G) rows(std::true_type());
      else rows(std::false_type());
    }
  });
  return y.reshape(out_shape);
}

// [Np, K] int8 (Np a multiple of 16) -> the int8 layout above, in place, block by block through a buffer
// of one block (no second copy of the weight: a 7B model's int8 weights re-laid out by new tensors left
// ~4 GB of freed heap behind, measured).
void int8_block_(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.device().is_cpu(),
              "a contiguous int8 CPU weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % LANES == 0 && K % 4 == 0, "rows a multiple of 16, in features of 4");
  auto* base = reinterpret_cast<uint8_t*>(w.data_ptr());
  at::parallel_for(0, N / LANES, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> tmp(LANES * K);
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* blk = base + b * LANES * K;
      std::memcpy(tmp.data(), blk, tmp.size());
      for (int64_t c = 0; c < K / 4; ++c)
        for (int64_t r = 0; r < LANES; ++r)
          for (int64_t j = 0; j < 4; ++j) blk[(c * LANES + r) * 4 + j] = tmp[r * K + 4 * c + j] ^ 0x80;
    }
  });
}

#endif  // MP_AVX512: the int8 and int4 kernels

// ---- one-query attention over a bf16 KV cache (decode), both builds ---------------------------------
//
// out[b, h] = softmax(q[b, h] . k[b, :, h / rep] * D^-0.5, masked) @ v[b, :, h / rep] for one query per
// row, bf16 in and out, fp32 inside (as the engine's fp32-upcast SDPA for bf16 decode, which converted
// the whole K and V to fp32 on every layer: 0.23 ms a layer at 128 keys, 1.9 ms at 1024, on 2 Zen 3
// cores). Here the cache rows are read in place, each key and value converted once in registers and
// shared by the rep = H / Hkv query heads of its group; work is split by (row, kv head).
namespace {
inline __m256 bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// exp(x) for 8 floats, within ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so that
// n ln2 is exact), exp(r) by its Taylor series to r^6 (the next term is below 1.3e-7 relative), 2^n
// put into the exponent bits. x is clamped to [-87.3, 88.3] (normal results only).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Scores of R query heads (qf: R x D fp32, pre-converted) against one key kr (D bf16): the key vector
// converted once for the R heads, one accumulator per head; s[j * ls] for head j.
template <int R>
inline void qk_heads(const float* qf, const uint16_t* kr, int64_t D, float scale, float* s, int64_t ls) {
  __m256 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x = bf16x8(kr + d);
    for (int j = 0; j < R; ++j) acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(qf + j * D + d), acc[j]);
  }
  for (int j = 0; j < R; ++j) s[j * ls] = hsum8(acc[j]) * scale;
}

// o[j] += sum_t p[j, t - t0] v[t] for R heads, keys t0 <= t < t1, 16 dims at a time in registers (2 x R
// accumulators), each value vector converted once for the R heads; the sum over t in key order. The
// caller passes chunks of keys whose values are in L2 over the D / 16 passes.
template <int R>
inline void pv_heads(const float* p, int64_t ls, const uint16_t* vb, int64_t vs, const bool* m, int64_t t0, int64_t t1,
                     int64_t D, float* o) {
  for (int64_t d = 0; d < D; d += 16) {
    __m256 a0[R], a1[R];
    for (int j = 0; j < R; ++j) {
      a0[j] = _mm256_loadu_ps(o + j * D + d);
      a1[j] = _mm256_loadu_ps(o + j * D + d + 8);
    }
    for (int64_t t = t0; t < t1; ++t) {
      if (!m[t]) continue;
      const uint16_t* vr = vb + t * vs + d;
      const __m256 x0 = bf16x8(vr), x1 = bf16x8(vr + 8);
      for (int j = 0; j < R; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j * ls + t - t0]);
        a0[j] = _mm256_fmadd_ps(pj, x0, a0[j]);
        a1[j] = _mm256_fmadd_ps(pj, x1, a1[j]);
      }
    }
    for (int j = 0; j < R; ++j) {
      _mm256_storeu_ps(o + j * D + d, a0[j]);
      _mm256_storeu_ps(o + j * D + d + 8, a1[j]);
    }
  }
}

#ifdef MP_AVX512
// The same two passes with 512-bit vectors, 32 dims a step (D % 32 == 0), for the AVX-512 build. Scores:
// vdpbf16ps straight on the bf16 query and key (each product exact in fp32, as in qk_heads; pairs summed
// in fp32). Values: converted to fp32 16 at a time and summed in fp32 with fp32 weights, key by key, as
// in pv_heads. About half the instructions of the AVX2 passes, which bound the kernel on a warm cache.
inline __m512 bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <int R>
inline void qk_heads512(const uint16_t* qb, const uint16_t* kr, int64_t D, float scale, float* s, int64_t ls) {
  __m512 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __m512i x = _mm512_loadu_si512(kr + d);
    for (int j = 0; j < R; ++j)
      acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(qb + j * D + d), (__m512bh)x);
  }
  for (int j = 0; j < R; ++j) s[j * ls] = _mm512_reduce_add_ps(acc[j]) * scale;
}

template <int R>
inline void pv_heads512(const float* p, int64_t ls, const uint16_t* vb, int64_t vs, const bool* m, int64_t t0,
                        int64_t t1, int64_t D, float* o) {
  for (int64_t d = 0; d < D; d += 32) {
    __m512 a0[R], a1[R];
    for (int j = 0; j < R; ++j) {
      a0[j] = _mm512_loadu_ps(o + j * D + d);
      a1[j] = _mm512_loadu_ps(o + j * D + d + 16);
    }
    for (int64_t t = t0; t < t1; ++t) {
      if (!m[t]) continue;
      const uint16_t* vr = vb + t * vs + d;
      const __m512 x0 = bf16x16(vr), x1 = bf16x16(vr + 16);
      for (int j = 0; j < R; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j * ls + t - t0]);
        a0[j] = _mm512_fmadd_ps(pj, x0, a0[j]);
        a1[j] = _mm512_fmadd_ps(pj, x1, a1[j]);
      }
    }
    for (int j = 0; j < R; ++j) {
      _mm512_storeu_ps(o + j * D + d, a0[j]);
      _mm512_storeu_ps(o + j * D + d + 16, a1[j]);
    }
  }
}
#endif

// dst = o / sum in bf16: one head's attention output from its unnormalised sum; zeros where no key was
// attended (sum 0).
inline void store_normalised(const float* o, float sum, int64_t D, c10::BFloat16* dst) {
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(o[d] * inv);
}

// f(std::integral_constant<int, R>) for R = min(4, left): the kernels above for a group of query heads.
template <typename F>
inline void by_heads(int64_t left, F&& f) {
  switch (std::min<int64_t>(4, left)) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}
}  // namespace

// q [B, H, D] bf16, k and v [B, K, Hkv, D] bf16 (any strides over B and K; each key's Hkv x D contiguous,
// as a slice of the cache), mask [B, K] bool (true: may attend) -> [B, H, D] bf16. A row with no key it
// may attend gets zeros.
//
// Split over the keys (flash-decoding): the keys come in chunks of KCHUNK, each chunk of each row one task.
// A task reads its chunk's cache rows in order, all heads of a key together (one kv head of one key is
// only 256 bytes at a 2 KB stride in the 7B's cache: walking one head at a time over a cold cache ran at
// half the speed); it keeps the chunk's scores, its softmax max and sum, and its unnormalised output, and
// the chunks of a row are merged in order at the end. The chunks do not depend on the number of threads
// or on the batch, so neither do the results.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q.size(0), "q [B, H, D], k and v [B, K, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "bf16 q, k and v");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(3) == D && D % 16 == 0 && Hkv > 0 && H % Hkv == 0, "head dim a multiple of 16, H a multiple of Hkv");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == D, "each key's heads contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == K, "mask [B, K] bool");
  const auto qc = q.contiguous();
  const auto mc = mask.contiguous();
  auto out = torch::empty({B, H, D}, q.options());
  constexpr int64_t KCHUNK = 64;  // keys a task (128 KB of K and of V at the 7B's 2 KB a key: in L2)
  const int64_t rep = H / Hkv, NC = std::max<int64_t>(1, (K + KCHUNK - 1) / KCHUNK);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
#ifdef MP_AVX512
  const bool wide = D % 32 == 0;  // the 512-bit passes; else the AVX2 ones (also in this build)
#else
  constexpr bool wide = false;
#endif
  const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  const bool* mp = mc.data_ptr<bool>();
  auto* op = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
  const int64_t kb = k.stride(0), kk = k.stride(1), vb = v.stride(0), vk = v.stride(1);
  // rows a pass: enough tasks for the threads, and one row at a time from 4 chunks a thread on (partial
  // outputs NC * H * D floats: 1 MB at 4096 keys of the 7B's heads; all 64 rows at once would be 64 MB)
  const int64_t threads = at::get_num_threads();
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(B, 4 * threads / NC + 1));
  // every entry a merge reads is written first by its task: no need to zero (8 MB at 32k keys)
  const std::unique_ptr<float[]> po(new float[NC > 1 ? rows * NC * H * D : 1]), pm(new float[rows * NC * H]),
      pl(new float[rows * NC * H]);
  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t nr = std::min(rows, B - r0);
    // too few tasks for the threads (short contexts, few rows): each chunk's kv heads in GS slices too.
    // The heads do not interact, so this changes no result.
    const int64_t GS = std::min(Hkv, std::max<int64_t>(1, (2 * threads + nr * NC - 1) / (nr * NC)));
    at::parallel_for(0, nr * NC * GS, 1, [&](int64_t u0, int64_t u1) {
      std::vector<float> qf(wide ? 0 : H * D), s(H * KCHUNK), o1(NC > 1 ? 0 : H * D);
      int64_t qrow = -1;
      for (int64_t w = u0; w < u1; ++w) {
        const int64_t u = w / GS, gs = w % GS, g0 = gs * Hkv / GS, g1 = (gs + 1) * Hkv / GS;
        const int64_t b = r0 + u / NC, c = u % NC, t0 = c * KCHUNK, t1 = std::min(K, t0 + KCHUNK);
        const bool* m = mp + b * K;
        const uint16_t* qr = qp + b * H * D;
        if (!wide && qrow != b) {
          for (int64_t d = 0; d < H * D; d += 8) _mm256_storeu_ps(qf.data() + d, bf16x8(qr + d));
          qrow = b;
        }
        // scores, key by key (masked keys and the rest of a short chunk -inf); each live key's value row
        // is fetched into the cache on the way, for the pass over values below
        std::fill(s.begin(), s.end(), -INFINITY);
        for (int64_t t = t0; t < t1; ++t) {
          if (!m[t]) continue;
          const uint16_t* kr = kp + b * kb + t * kk;
          const char* vr = reinterpret_cast<const char*>(vp + b * vb + t * vk);
          for (int64_t e = g0 * D * 2; e < g1 * D * 2; e += 64) _mm_prefetch(vr + e, _MM_HINT_T0);
          for (int64_t g = g0; g < g1; ++g)
            for (int64_t j0 = 0; j0 < rep; j0 += 4) {
              const int64_t h = g * rep + j0;
              float* sh = s.data() + h * KCHUNK + (t - t0);
#ifdef MP_AVX512
              if (wide) {
                by_heads(rep - j0, [&](auto R) { qk_heads512<decltype(R)::value>(qr + h * D, kr + g * D, D, scale, sh, KCHUNK); });
                continue;
              }
#endif
              by_heads(rep - j0, [&](auto R) { qk_heads<decltype(R)::value>(qf.data() + h * D, kr + g * D, D, scale, sh, KCHUNK); });
            }
        }
        // softmax numerators over the chunk, masked ones exactly 0; the chunk's max and sum
        float* pmu = pm.get() + u * H;
        float* plu = pl.get() + u * H;
        for (int64_t h = g0 * rep; h < g1 * rep; ++h) {
          float* sh = s.data() + h * KCHUNK;
          const float mx = *std::max_element(sh, sh + KCHUNK);
          pmu[h] = mx;
          if (mx == -INFINITY) {
            plu[h] = 0.f;
            continue;
          }
          __m256 tot = _mm256_setzero_ps();
          for (int64_t t = 0; t < KCHUNK; t += 8) {
            const __m256 x = _mm256_loadu_ps(sh + t);
            const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            const __m256 e = _mm256_and_ps(live, exp8(_mm256_sub_ps(x, _mm256_set1_ps(mx))));
            _mm256_storeu_ps(sh + t, e);
            tot = _mm256_add_ps(tot, e);
          }
          plu[h] = hsum8(tot);
        }
        // the chunk's unnormalised output, kv head by kv head (its values are in the cache by now)
        float* o = NC > 1 ? po.get() + u * H * D : o1.data();
        std::fill(o + g0 * rep * D, o + g1 * rep * D, 0.f);
        for (int64_t g = g0; g < g1; ++g) {
          const uint16_t* vg = vp + b * vb + g * D;
          for (int64_t j0 = 0; j0 < rep; j0 += 4) {
            const int64_t h = g * rep + j0;
            const float* p0 = s.data() + h * KCHUNK;
#ifdef MP_AVX512
            if (wide) {
              by_heads(rep - j0, [&](auto R) { pv_heads512<decltype(R)::value>(p0, KCHUNK, vg, vk, m, t0, t1, D, o + h * D); });
              continue;
            }
#endif
            by_heads(rep - j0, [&](auto R) { pv_heads<decltype(R)::value>(p0, KCHUNK, vg, vk, m, t0, t1, D, o + h * D); });
          }
        }
        if (NC == 1)  // the row's only chunk: its output, as the merge below would make it with weight 1
          for (int64_t h = g0 * rep; h < g1 * rep; ++h) store_normalised(o + h * D, plu[h], D, op + (b * H + h) * D);
      }
    });
    if (NC == 1) continue;
    // merge each row's chunks in order: weights exp(max_c - max); small merges on this thread
    at::parallel_for(0, nr * H, std::max<int64_t>(1, 16384 / (NC * D)), [&](int64_t w0, int64_t w1) {
      std::vector<float> acc(D);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t i = w / H, h = w % H;
        float mx = -INFINITY;
        for (int64_t c = 0; c < NC; ++c) mx = std::max(mx, pm[(i * NC + c) * H + h]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float tot = 0.f;
        if (mx != -INFINITY)
          for (int64_t c = 0; c < NC; ++c) {
            const int64_t ix = (i * NC + c) * H + h;
            if (pl[ix] == 0.f) continue;
            const float wgt = std::exp(pm[ix] - mx);
            tot += wgt * pl[ix];
            const float* oc = po.get() + ix * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += wgt * oc[d];
          }
        store_normalised(acc.data(), tot, D, op + ((r0 + i) * H + h) * D);
      }
    });
  }
  return out;
}

// A read-bandwidth probe: the sum of a float32 buffer with four independent AVX-512 accumulators per
// thread (torch's own sum reads at ~60 % of this on the machines measured; see bench --bandwidth).
// Each thread reads its share as `streams` equal parts side by side (several streams in flight read
// faster on some hosts, as the bf16 kernel does at one row).
double read_probe(torch::Tensor buf, int64_t streams) {
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous() && buf.numel() % 64 == 0, "float32, 64n");
  TORCH_CHECK(streams >= 1 && streams <= 8, "1 to 8 streams");
  const auto* p = buf.data_ptr<float>();
  const int64_t n = buf.numel() / 64;  // 4 vectors a step
  std::vector<double> part(at::get_num_threads() + 1, 0.0);
  at::parallel_for(0, n, 1024, [&](int64_t a, int64_t b) {
#ifdef MP_AVX512
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    auto add = [&](const float* q) {
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(q));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(q + 16));
      s2 = _mm512_add_ps(s2, _mm512_loadu_ps(q + 32));
      s3 = _mm512_add_ps(s3, _mm512_loadu_ps(q + 48));
    };
#else  // AVX2: eight 8-lane accumulators, the same 64 floats a step
    __m256 s[8];
    for (auto& v : s) v = _mm256_setzero_ps();
    auto add = [&](const float* q) {
      for (int j = 0; j < 8; ++j) s[j] = _mm256_add_ps(s[j], _mm256_loadu_ps(q + 8 * j));
    };
#endif
    const int64_t h = (b - a) / streams;
    for (int64_t i = 0; i < h; ++i)
      for (int64_t t = 0; t < streams; ++t) add(p + (a + t * h + i) * 64);
    for (int64_t i = a + streams * h; i < b; ++i) add(p + i * 64);
#ifdef MP_AVX512
    part[at::get_thread_num()] += reduce(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#else
    for (int j = 1; j < 8; ++j) s[0] = _mm256_add_ps(s[0], s[j]);
    part[at::get_thread_num()] += reduce(s[0]);
#endif
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_probe", &read_probe, "sum of a float32 buffer, each thread's share read as `streams` parts side by side (a read-bandwidth probe)");
  m.def("block_weight", &block_weight, "[out, in] bf16 weight -> the kernel's blocked layout");
  m.def("unblock_weight", &unblock_weight, "the inverse of block_weight");
  m.def("blocked_linear", &blocked_linear, "x [..., in] bf16 @ blocked weight^T -> [..., out] bf16");
  m.def("decode_attention", &decode_attention, "one query per row: q [B, H, D] over k, v [B, K, Hkv, D] with mask [B, K] -> [B, H, D], bf16");
#ifdef MP_AVX512
  m.attr("ISA") = "avx512";
  m.def("int8_linear", &int8_linear,
        "x [..., in] @ (int8 weight (int8_block_'s layout) * scales, per channel or per group of G)^T -> [..., n] float32");
  m.def("int8_block_", &int8_block_, "[Np, K] int8 -> the int8 kernel's layout, in place");
  m.def("int4_linear", &int4_linear, "x [..., in] (int8 per group) @ (int4 weight, group-wise)^T -> [..., out] float32");
#else
  m.attr("ISA") = "avx2";
#endif
}
