// rnan_fast._C: the CPU kernel of non-local attention, forward and backward, both softmax modes
//   S = theta phi^T (unscaled), out = P g,
//   "query" (official RNAN, softmax dim=1): P_ij = exp(S_ij - LSE_j), normalised over queries i;
//   "key"   (ordinary attention):           P_ij = exp(S_ij - LSE_i), normalised over keys j.
// Schemas (TORCH_LIBRARY_FRAGMENT below; fakes and autograd in rnan_fast/ops/nonlocal_attention.py):
//   nonlocal_attention_fwd(theta, phi, g, softmax_over) -> (out, stats)
//   nonlocal_attention_bwd(dout, theta, phi, g, stats, softmax_over) -> (dtheta, dphi, dg)
//
// Flash structure: the scores exist only as tiles of kBlockQ queries x kBlockK keys (64 KiB of
// fp32 each, in L2); nothing of size N x N is ever stored. Extra memory: stats (2, B, N) fp32,
// plus D (B, N) fp32 in the backward, plus O(tile) per thread, plus in the column backward up to
// kPartialBudget (64 MiB) of partial sums of dTheta.
//
// Statistics, as the Triton kernel keeps them: stats[0] = m, the max score of each softmax
// (natural units), stats[1] = r = log2 sum exp2((S - m) log2 e); every weight is then
// exp2((S - m) log2 e - r). S - m is exact near the max (Sterbenz), so the dominant weight of a
// saturated softmax (scores ~1e4 on 0..255 images, where one fp32 ulp of S is ~1e-3) is 1 to the
// last bit, provided every pass gets the same bits for S_ij: every pass computes S with the very
// same arithmetic, `Attention::scores` (one sgemm call shape on the portable path; one chain of
// FMAs over k, `score_block`, on the AVX-512 path, whose fused column forward uses it too).
//
// Column softmax ("query"):
//   pass 1, key-major (one task per key block): online (max, sum) over all query blocks;
//   pass 2, query-major (one task per query block): acc_i = sum_j exp2((S_ij - m_j) log2e - r_j) g_j,
//           every weight final and <= 1: no running max, no rescale, no divide. 2 N^2 exps.
// Row softmax ("key"): one query-major online-softmax pass (running max and sum per query,
//   rescaled accumulator, a final divide). N^2 exps.
// Backward, P recomputed from the statistics, dP = dY g^T, dS = P (dP - D):
//   "query": key-major pass: loop 1 dG_J = sum_I P^T dY_I, D_j = g_j . dG_j; loop 2 dPhi_J =
//            sum_I dS^T theta_I, and dS phi_J into a per-key-block partial of dTheta, summed in
//            key-block order after (2 N^2 exps); where those partials would exceed 64 MiB, a
//            query-major pass dTheta_I = sum_J dS phi_J instead (3 N^2 exps).
//   "key":   query-major pass: loop 1 D_i = sum_j P_ij dP_ij, loop 2 dTheta_I; then a key-major
//            pass: dG_J and dPhi_J. 3 N^2 exps.
// Determinism: every output block is owned by one task and accumulated over the other index in
// a fixed order; the tile grid depends on N only, never on the thread count. So results are
// bit-identical from run to run and for any number of threads (the tests check 1 vs 2 threads).
//
// Arithmetic, all fp32. Three paths, one per process, the best the CPU has by default
// (`set_cpu_attention_isa`):
//   "avx512" (CPUs with AVX-512F/DQ): score tiles and the whole column forward are the
//     register-blocked microkernels of the AVX-512 section below (1.4x SDPA's one-pass row
//     forward at N = 16384, d = 32, against 2.0x on the portable path; BENCHMARKS.md); the
//     backward's dP and product tiles stay on sgemm, its elementwise loops as below;
//   "avx2" (CPUs with AVX2 and FMA, e.g. AMD Zen): the column forward fused as on the AVX-512
//     path, in 6 x 16 register blocks (0.70-0.80x the time of the MKL-tile path on an AMD EPYC at
//     N = 16384, d = 16-32); the backward's score, dP and product tiles through the register-
//     blocked gemm of the AVX2 section below (10-19% faster than MKL's sgemm there), its
//     elementwise loops as below;
//   "portable" (any x86-64): score, dP and product tiles through MKL's sgemm (blocked and
//     vectorised; called from inside the parallel loop, where MKL runs single-threaded; ATen's
//     mm where PyTorch was built without MKL), the elementwise work on a tile (exp2, max, sums,
//     dS) through plain C++ loops compiled for three x86-64 levels (target_clones), with a
//     polynomial exp2 (relative error ~3e-9 plus rounding) so that they vectorise (GCC 12 needs
//     -fno-trapping-math for that; setup.py).
// bf16 inputs are widened to fp32 once (O(N d)) and the results rounded back: their products are
// exact in fp32 either way, and MKL's bf16 gemm
// (cblas_gemm_bf16bf16f32) measured 1.5-3x slower than sgemm at these tile shapes (d = 16: fwd
// 483 ms against 150 ms at B = 16, N = 48^2), so bf16 buys no speed here, only memory.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "cpu_math.h"
#include "nonlocal_attention.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace rnan_fast {
namespace {

constexpr float kLog2e = 1.44269504088896341f;
// Tile: 64 queries x 256 keys = 64 KiB of fp32 scores per tile buffer (a task holds two, S and
// dP, plus its accumulators: well inside a 1-2 MiB L2). A key block spans 256 keys so that the
// gemms of the weighted sum (k = 256) run near their peak; 64 queries give N / 64 query tasks
// (256 at N = 128^2) to share among the threads.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;
constexpr int64_t key_blocks(int64_t N) { return (N + kBlockK - 1) / kBlockK; }
// Column backward: dTheta from per-key-block partial sums while they take at most this much
// memory (training batches: 9 blocks x 16 x 48^2 x 16 fp32 = 21 MiB), else by a query-major pass.
constexpr int64_t kPartialBudget = int64_t(64) << 20;

// 2^x in float32 by plain arithmetic so that the loops calling it vectorise: k = round(x) by the
// 1.5 * 2^23 trick, 2^(x - k) on [-1/2, 1/2] by a degree-6 polynomial (relative error 2.6e-9,
// fitted here with p(0) = 1 exactly, so exp2(0) = 1), times 2^k from the exponent bits. x is
// clamped to [-127, 127]: below -127 the result is exactly 0 (the exponent field is 0), which is
// what a weight of 2^-127 should be; -inf gives 0 and NaN passes through.
constexpr int kExp2Terms = 7;
constexpr float kExp2Poly[kExp2Terms] = {1.5337577497e-4f, 1.3399859890e-3f, 9.6185198054e-3f, 5.5503290147e-2f,
                                         2.4022646248e-1f, 6.9314718246e-1f, 1.0f};  // highest degree first
RNAN_ALWAYS_INLINE float exp2_f32(float x) {
  const bool nan = !(x == x);
  float c = nan ? 0.0f : x;
  c = c < -127.0f ? -127.0f : c;
  c = c > 127.0f ? 127.0f : c;
  const float k = (c + 12582912.0f) - 12582912.0f;
  const float f = c - k;
  float p = kExp2Poly[0];
  for (int n = 1; n < kExp2Terms; ++n) p = p * f + kExp2Poly[n];
  const float scale = cpu::float_from_bits((static_cast<int32_t>(k) + 127) << 23);
  return nan ? x : p * scale;
}

// Reductions along a row in kLanes independent partial results, combined in a fixed order at the
// end: GCC vectorises these without -ffast-math (a plain `sum += x[j]` would stay scalar, since
// reassociating it changes the result), and the result depends on n only, not on the threads.
constexpr int64_t kLanes = 16;

RNAN_ALWAYS_INLINE float row_max(const float* __restrict x, int64_t n, float init) {
  float part[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) part[l] = init;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] = x[j + l] > part[l] ? x[j + l] : part[l];
  for (; j < n; ++j) part[0] = x[j] > part[0] ? x[j] : part[0];
  float mx = part[0];
  for (int64_t l = 1; l < kLanes; ++l) mx = part[l] > mx ? part[l] : mx;
  return mx;
}

RNAN_ALWAYS_INLINE float lanes_total(const float* part) {
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

// ---- elementwise work on one score tile s (rows x cols, row stride ld), fp32 -------------------
// Column statistics: online update of (m_j, l_j) over one more block of queries.
RNAN_CPU_CLONES void col_stats_update(const float* __restrict s, int64_t rows, int64_t cols, int64_t ld,
                                      float* __restrict m, float* __restrict l, float* __restrict tmax) {
  for (int64_t j = 0; j < cols; ++j) tmax[j] = m[j];
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = s + i * ld;
    for (int64_t j = 0; j < cols; ++j) tmax[j] = row[j] > tmax[j] ? row[j] : tmax[j];
  }
  for (int64_t j = 0; j < cols; ++j) l[j] *= exp2_f32((m[j] - tmax[j]) * kLog2e);
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = s + i * ld;
    for (int64_t j = 0; j < cols; ++j) l[j] += exp2_f32((row[j] - tmax[j]) * kLog2e);
  }
  for (int64_t j = 0; j < cols; ++j) m[j] = tmax[j];
}

// Column weights in place: s_ij <- exp2((s_ij - m_j) log2e - r_j).
RNAN_CPU_CLONES void col_weights(float* __restrict s, int64_t rows, int64_t cols, int64_t ld,
                                 const float* __restrict m, const float* __restrict r) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    for (int64_t j = 0; j < cols; ++j) row[j] = exp2_f32((row[j] - m[j]) * kLog2e - r[j]);
  }
}

// Row weights in place: s_ij <- exp2((s_ij - m_i) log2e - r_i).
RNAN_CPU_CLONES void row_weights(float* __restrict s, int64_t rows, int64_t cols, int64_t ld,
                                 const float* __restrict m, const float* __restrict r) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    const float mi = m[i], ri = r[i];
    for (int64_t j = 0; j < cols; ++j) row[j] = exp2_f32((row[j] - mi) * kLog2e - ri);
  }
}

// Online row softmax over one more key block: s <- exp2((s - m_new) log2e), l and the
// accumulator rows (acc, rows x dv) rescaled by exp2((m_old - m_new) log2e), l += row sums.
RNAN_CPU_CLONES void row_online(float* __restrict s, int64_t rows, int64_t cols, int64_t ld,
                                float* __restrict m, float* __restrict l, float* __restrict acc, int64_t dv) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    const float mx = row_max(row, cols, m[i]);
    const float alpha = exp2_f32((m[i] - mx) * kLog2e);
    float part[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) {
        row[j + q] = exp2_f32((row[j + q] - mx) * kLog2e);
        part[q] += row[j + q];
      }
    for (; j < cols; ++j) {
      row[j] = exp2_f32((row[j] - mx) * kLog2e);
      part[0] += row[j];
    }
    float* a = acc + i * dv;
    for (int64_t c = 0; c < dv; ++c) a[c] *= alpha;
    l[i] = l[i] * alpha + lanes_total(part);
    m[i] = mx;
  }
}

// dS in place of P: column mode dS_ij = P_ij (dP_ij - D_j), row mode dS_ij = P_ij (dP_ij - D_i).
RNAN_CPU_CLONES void ds_col(float* __restrict p, const float* __restrict dp, int64_t rows, int64_t cols, int64_t ld,
                            const float* __restrict D) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = p + i * ld;
    const float* drow = dp + i * ld;
    for (int64_t j = 0; j < cols; ++j) row[j] = row[j] * (drow[j] - D[j]);
  }
}

RNAN_CPU_CLONES void ds_row(float* __restrict p, const float* __restrict dp, int64_t rows, int64_t cols, int64_t ld,
                            const float* __restrict D) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = p + i * ld;
    const float* drow = dp + i * ld;
    const float di = D[i];
    for (int64_t j = 0; j < cols; ++j) row[j] = row[j] * (drow[j] - di);
  }
}

// D_i += sum_j P_ij dP_ij (row mode, one key block).
RNAN_CPU_CLONES void row_dot_add(const float* __restrict p, const float* __restrict dp, int64_t rows, int64_t cols,
                                 int64_t ld, float* __restrict D) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = p + i * ld;
    const float* drow = dp + i * ld;
    float part[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) part[q] += row[j + q] * drow[j + q];
    for (; j < cols; ++j) part[0] += row[j] * drow[j];
    D[i] += lanes_total(part);
  }
}

// ---- gemm --------------------------------------------------------------------------------------
}  // namespace
}  // namespace rnan_fast

// MKL's sgemm, which PyTorch's x86 builds link and export from libtorch_cpu (LP64: int sizes).
// Weak, so that the extension still loads against a PyTorch without MKL; `mm` then uses ATen's mm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace rnan_fast {
namespace {

// Row-major C (m x n, ldc) = beta C + op(A) op(B), op(A) m x k, op(B) k x n, all fp32. Sizes are
// tiles, head dims and row strides, all far below 2^31.
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
        float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum (head dim 0); BLAS would reject the leading dimension 0
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  if (sgemm_ != nullptr) {
    // Fortran is column-major: the row-major product is C^T = op(B)^T op(A)^T.
    const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
    const float one = 1.0f;
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
    return;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor A = at::from_blob(const_cast<float*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, f32);
  at::Tensor Bm = at::from_blob(const_cast<float*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, f32);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, f32);
  at::Tensor prod = at::mm(ta ? A.t() : A, tb ? Bm.t() : Bm);
  beta == 0.0f ? C.copy_(prod) : C.mul_(beta).add_(prod);
}

// Key j of one batch's packed phi^T, the AVX-512 path's layout (key blocks, d, kBlockK; see
// below): block j / kBlockK, column j % kBlockK.
inline const float* packed_key(const float* kt_batch, int64_t d, int64_t j) {
  return kt_batch + (j / kBlockK) * d * kBlockK + j % kBlockK;
}

// Pointers to the R query rows of a register block starting at row q0 (stride d) with rv <= R
// valid rows; the others repeat the last valid row (computed, never used).
template <int R>
RNAN_ALWAYS_INLINE void block_rows(const float* q0, int64_t d, int64_t rv, const float* (&q)[R]) {
  for (int r = 0; r < R; ++r) q[r] = q0 + std::min<int64_t>(r, rv - 1) * d;
}

// ---- AVX-512 microkernels ----------------------------------------------------------------------
// On CPUs with AVX-512F and DQ (detected at load time; `set_cpu_attention_isa("portable")` turns them
// off, for tests and comparisons) the score tiles of every pass come from score_block instead of
// MKL, and the column forward fuses each block's gemm, exps and reductions in registers: a block
// of 8 queries x 32 keys of S lives in 16 zmm registers; pass 1 folds it straight into the
// per-key (max, sum), pass 2 turns it into weights and multiplies them by g from an 8 x 64
// buffer in L1. On the MKL path each 64 KiB score tile goes through L2 three times per pass
// (written by sgemm, read by the exps, read by the next sgemm), and each sgemm call packs its
// operands for a k of only d (16-64) or 256. S_ij is one chain of FMAs over k = 0..d-1 in every
// pass, so its bits agree between passes as the file comment requires. phi comes transposed and
// packed per key block, (B, key blocks, d, kBlockK) with zeros past N, so that a row of keys is a
// vector and a block's d rows lie 1 KiB apart: rows N floats apart (the plain transpose) fall into
// the same few L1 sets when N is a multiple of 1024, and measured 25% slower at N = 16384.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RNAN_HAVE_AVX512 1
// GCC 12 warns "__Y may be used uninitialized" inside its own avx512fintrin.h (the deliberately
// undefined pass-through operand of roundscale / scalef); nothing of ours is uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define RNAN_AVX512 __attribute__((target("avx512f,avx512dq")))
#define RNAN_AVX512_INLINE inline __attribute__((target("avx512f,avx512dq"), always_inline))
#define RNAN_AVX512_NOINLINE __attribute__((target("avx512f,avx512dq"), noinline))
// The loops over a block's registers (rows, vectors, polynomial terms) unrolled, so that the
// block stays in registers rather than in an array on the stack.
#define RNAN_UNROLL _Pragma("GCC unroll 16")

constexpr int kRegRows = 8;       // queries per register block
constexpr int64_t kRegKeys = 32;  // keys per register block: two zmm
// Keys per product call of pass 2 (two register blocks of weights): its 8 x 2 accumulators are
// loaded and stored once per 64 keys, 3% of the call's instructions at d_v = 32 (6% at 32 keys).
constexpr int64_t kWeightKeys = 2 * kRegKeys;

// The first n of 16 lanes (n <= 0: none, n >= 16: all).
RNAN_AVX512_INLINE __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// 2^x on 16 lanes: p(f) for f = x - floor(x) in [0, 1) (vreduceps), times 2^floor(x) (vscalefps,
// which also gives 0 below 2^-149, inf above 2^128, and passes NaN). p: degree 5, fitted here for
// relative error 1.6e-7 (2.7 fp32 ulps; exp2_f32's degree 6 has 1e-7 and one more FMA), with
// p(0) = 1 exactly so that the dominant weight of a saturated softmax is exactly 1. -inf would
// give NaN: kFromInf first raises x to at least -150 (vmaxps returns its second operand, x, when
// x is NaN), for the one caller whose x can be -inf (the rescale from the initial running max);
// every other x is a finite score difference (or NaN) and skips that op.
constexpr int kExp2VTerms = 6;
constexpr float kExp2VPoly[kExp2VTerms] = {1.8671307480e-03f, 9.0170288458e-03f, 5.5799912661e-02f,
                                           2.4016444385e-01f, 6.9315129519e-01f, 1.0f};  // highest degree first
template <bool kFromInf>
RNAN_AVX512_INLINE __m512 exp2_v(__m512 x) {
  if (kFromInf) x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(kExp2VPoly[0]);
  RNAN_UNROLL
  for (int n = 1; n < kExp2VTerms; ++n) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2VPoly[n]));
  return _mm512_scalef_ps(p, x);
}

// s[r][c] = S of query row q[r] and keys 16c..16c+15 of kt (packed phi^T at the block's first
// key, rows of stride kBlockK); lanes masked off by m0 / m1 (keys past the end) hold 0.
RNAN_AVX512_INLINE void score_block(const float* const* q, int64_t d, const float* kt, __mmask16 m0, __mmask16 m1,
                                    __m512 (&s)[kRegRows][2]) {
  RNAN_UNROLL
  for (int r = 0; r < kRegRows; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, kt + k * kBlockK);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, kt + k * kBlockK + 16);
    RNAN_UNROLL
    for (int r = 0; r < kRegRows; ++r) {
      const __m512 a = _mm512_set1_ps(q[r][k]);
      s[r][0] = _mm512_fmadd_ps(a, b0, s[r][0]);
      s[r][1] = _mm512_fmadd_ps(a, b1, s[r][1]);
    }
  }
}


// The score tile S[0:mi, 0:nj] (theta rows q0, stride d; kt: packed phi^T at the first key) into
// s, row stride kBlockK: what Attention::scores gives on this path.
RNAN_AVX512 void scores_tile_avx512(const float* q0, int64_t d, const float* kt, int64_t mi, int64_t nj, float* s) {
  __m512 v[kRegRows][2];
  const float* q[kRegRows];
  for (int64_t r0 = 0; r0 < mi; r0 += kRegRows) {
    const int64_t rv = std::min<int64_t>(kRegRows, mi - r0);
    block_rows(q0 + r0 * d, d, rv, q);
    for (int64_t js = 0; js < nj; js += kRegKeys) {
      const __mmask16 m0 = lane_mask(nj - js), m1 = lane_mask(nj - js - 16);
      score_block(q, d, kt + js, m0, m1, v);
      RNAN_UNROLL
      for (int r = 0; r < kRegRows; ++r) {  // constant indices into v: it stays in registers
        if (r >= rv) break;
        _mm512_mask_storeu_ps(s + (r0 + r) * kBlockK + js, m0, v[r][0]);
        _mm512_mask_storeu_ps(s + (r0 + r) * kBlockK + js + 16, m1, v[r][1]);
      }
    }
  }
}

// Pass 1 of the column forward for keys j0..j0+nj-1 (nj <= kBlockK) of one batch: the max m_j of
// S over all N queries and r_j = log2 sum_i exp2((S_ij - m_j) log2e). q: theta (N, d); kt: the
// key block of packed phi^T. The running max is raised only when a block of 8 queries exceeds it (a
// few times per key), the running sum then rescaled by exp2 of the difference.
RNAN_AVX512 void col_stats_avx512(const float* q_all, const float* kt, int64_t N, int64_t d, int64_t nj, float* m_out,
                                  float* r_out) {
  alignas(64) float m[kBlockK], l[kBlockK];
  std::fill(m, m + kBlockK, -std::numeric_limits<float>::infinity());
  std::fill(l, l + kBlockK, 0.0f);
  const __m512 log2e = _mm512_set1_ps(kLog2e), zero = _mm512_setzero_ps();
  __m512 v[kRegRows][2];
  const float* q[kRegRows];
  for (int64_t i0 = 0; i0 < N; i0 += kRegRows) {
    const int64_t rv = std::min<int64_t>(kRegRows, N - i0);
    block_rows(q_all + i0 * d, d, rv, q);
    for (int64_t js = 0; js < nj; js += kRegKeys) {
      score_block(q, d, kt + js, lane_mask(nj - js), lane_mask(nj - js - 16), v);
      RNAN_UNROLL
      for (int c = 0; c < 2; ++c) {
        float *mc = m + js + 16 * c, *lc = l + js + 16 * c;
        const __m512 bmax = _mm512_max_ps(
            _mm512_max_ps(_mm512_max_ps(v[0][c], v[1][c]), _mm512_max_ps(v[2][c], v[3][c])),
            _mm512_max_ps(_mm512_max_ps(v[4][c], v[5][c]), _mm512_max_ps(v[6][c], v[7][c])));
        const __m512 m_old = _mm512_load_ps(mc), m_new = _mm512_max_ps(m_old, bmax);
        __m512 lv = _mm512_load_ps(lc);
        if (_mm512_cmp_ps_mask(m_old, m_new, _CMP_LT_OQ) != 0) {
          lv = _mm512_mul_ps(lv, exp2_v<true>(_mm512_mul_ps(_mm512_sub_ps(m_old, m_new), log2e)));
          _mm512_store_ps(mc, m_new);
        }
        __m512 e[kRegRows];
        RNAN_UNROLL
        for (int r = 0; r < kRegRows; ++r) {
          // Rows past N repeat the last query (block_rows): harmless in the max, left out of the sum.
          e[r] = r < rv ? exp2_v<false>(_mm512_mul_ps(_mm512_sub_ps(v[r][c], m_new), log2e)) : zero;
        }
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(e[0], e[1]), _mm512_add_ps(e[2], e[3])),
                                         _mm512_add_ps(_mm512_add_ps(e[4], e[5]), _mm512_add_ps(e[6], e[7])));
        _mm512_store_ps(lc, _mm512_add_ps(lv, sum));
      }
    }
  }
  for (int64_t j = 0; j < nj; ++j) {
    m_out[j] = m[j];
    r_out[j] = std::log2(l[j]);
  }
}

// acc[r][c0:c0+16V] += sum_{j < nk} p[r][j] g[j][c0:...] for the 8 rows (row stride dv), j in
// order, on the lanes in mask (V = 2: all of both vectors).
// Not inlined: its 8 x V accumulators need the registers that the caller's exp constants hold
// (inlined, GCC spilled the accumulators inside the j loop).
template <int V>
RNAN_AVX512_NOINLINE void add_weighted_rows(const float (&p)[kRegRows][kWeightKeys], int64_t nk, const float* g,
                                            int64_t dv, float* acc, __mmask16 mask) {
  __m512 x[kRegRows][V];
  RNAN_UNROLL
  for (int r = 0; r < kRegRows; ++r)
    RNAN_UNROLL
    for (int c = 0; c < V; ++c) x[r][c] = _mm512_maskz_loadu_ps(mask, acc + r * dv + 16 * c);
  for (int64_t j = 0; j < nk; ++j) {
    __m512 gj[V];
    RNAN_UNROLL
    for (int c = 0; c < V; ++c) gj[c] = _mm512_maskz_loadu_ps(mask, g + j * dv + 16 * c);
    RNAN_UNROLL
    for (int r = 0; r < kRegRows; ++r) {
      const __m512 w = _mm512_set1_ps(p[r][j]);
      RNAN_UNROLL
      for (int c = 0; c < V; ++c) x[r][c] = _mm512_fmadd_ps(w, gj[c], x[r][c]);
    }
  }
  RNAN_UNROLL
  for (int r = 0; r < kRegRows; ++r)
    RNAN_UNROLL
    for (int c = 0; c < V; ++c) _mm512_mask_storeu_ps(acc + r * dv + 16 * c, mask, x[r][c]);
}

// Pass 2 of the column forward for queries i0..i0+mi-1 (mi <= kBlockQ) of one batch: out rows =
// sum_j exp2((S_ij - m_j) log2e - r_j) g_j. q_all: theta (N, d); kt: packed phi^T (key blocks,
// d, kBlockK); g: (N, dv);
// m, r: the statistics (N); acc: kBlockQ x dv scratch.
RNAN_AVX512 void col_output_avx512(const float* q_all, const float* kt, const float* g, const float* m, const float* r,
                                   int64_t N, int64_t d, int64_t dv, int64_t i0, int64_t mi, float* acc, float* out) {
  std::fill(acc, acc + kBlockQ * dv, 0.0f);
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  alignas(64) float p[kRegRows][kWeightKeys];
  __m512 v[kRegRows][2];
  const float* q[kRegRows];
  // Keys outer, queries inner: the 64 keys' phi^T (d x 64) and g (64 x dv) stay in L1 while the
  // 8 register blocks of queries pass over them (with the queries outer they came from L2 once per
  // block). Each row still sums its keys in increasing order.
  for (int64_t js = 0; js < N; js += kWeightKeys) {
    const int64_t nk = std::min(kWeightKeys, N - js);
    const float* kt_keys = packed_key(kt, d, js);
    for (int64_t r0 = 0; r0 < mi; r0 += kRegRows) {
      block_rows(q_all + (i0 + r0) * d, d, std::min<int64_t>(kRegRows, mi - r0), q);
      for (int64_t h = 0; h < nk; h += kRegKeys) {  // one or two register blocks of weights
        const __mmask16 mk[2] = {lane_mask(nk - h), lane_mask(nk - h - 16)};
        score_block(q, d, kt_keys + h, mk[0], mk[1], v);
        RNAN_UNROLL
        for (int c = 0; c < 2; ++c) {
          const __m512 mv = _mm512_maskz_loadu_ps(mk[c], m + js + h + 16 * c);
          const __m512 rvec = _mm512_maskz_loadu_ps(mk[c], r + js + h + 16 * c);
          RNAN_UNROLL
          for (int rr = 0; rr < kRegRows; ++rr)
            _mm512_store_ps(&p[rr][h + 16 * c],
                            exp2_v<false>(_mm512_fmsub_ps(_mm512_sub_ps(v[rr][c], mv), log2e, rvec)));
        }
      }
      const float* gj = g + js * dv;
      float* acc_rows = acc + r0 * dv;  // rows past mi land in acc's spare rows, never copied out
      int64_t c0 = 0;
      for (; c0 + 32 <= dv; c0 += 32) add_weighted_rows<2>(p, nk, gj + c0, dv, acc_rows + c0, 0xFFFF);
      for (; c0 < dv; c0 += 16) add_weighted_rows<1>(p, nk, gj + c0, dv, acc_rows + c0, lane_mask(dv - c0));
    }
  }
  std::copy(acc, acc + mi * dv, out);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// ---- AVX2 small gemm ---------------------------------------------------------------------------
// On x86-64 CPUs with AVX2 and FMA but without AVX-512 (AMD Zen 2-4, older Intel) every tile
// product outside the fused column forward is this register-blocked gemm instead of MKL's sgemm:
// blocks of 6 rows x 16 columns of C in 12 ymm registers (of 16), which made the kernel 10-19%
// faster than MKL at the tile shapes here (m 64-256, n 16-256, k 16-256) on an AMD EPYC, as MKL
// repacks its operands in every call at these small sizes. B is always read by rows
// (op(B) = B): the score and dP tiles take phi^T and g^T packed per key block (the AVX-512 path's
// layout), so no operand is packed per call. Each C element is one chain of FMAs over k = 0..K-1,
// added to beta C at the end: S_ij gets the same bits in every pass (the file comment).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RNAN_HAVE_AVX2 1
#define RNAN_AVX2 __attribute__((target("avx2,fma")))
#define RNAN_AVX2_INLINE inline __attribute__((target("avx2,fma"), always_inline))

constexpr int kGemmRows = 6;      // rows of C per register block (x 2 ymm = 12 accumulators)
constexpr int64_t kGemmCols = 16;  // columns of C per register block

// All-ones in the first n of 8 lanes (the mask of vmaskmovps).
RNAN_AVX2_INLINE __m256i lane_mask8(int64_t n) {
  const int k = int(std::clamp<int64_t>(n, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 floats at x, or only the lanes in mask (the others 0).
RNAN_AVX2_INLINE __m256 load_lanes(const float* x, bool masked, __m256i mask) {
  return masked ? _mm256_maskload_ps(x, mask) : _mm256_loadu_ps(x);
}

// x[r][v] = sum_{p < k} A(r, p) B[p][8v:8v+8], one chain of FMAs per element from zero: A(r, p)
// at ar[r][p] (kTA false) or ar[r][p lda] (kTA true); B rows of stride ldb, the last of the V
// vectors only on the lanes in mask (kMask; the others 0). Every score of the AVX2 path, fused
// or tiled, comes from here, so S_ij has the same bits in every pass (the file comment).
template <bool kTA, int V, bool kMask>
RNAN_AVX2_INLINE void block_products(const float* const (&ar)[kGemmRows], int64_t lda, const float* b, int64_t ldb,
                                     int64_t k, __m256i mask, __m256 (&x)[kGemmRows][V]) {
  RNAN_UNROLL
  for (int r = 0; r < kGemmRows; ++r)
    RNAN_UNROLL
    for (int v = 0; v < V; ++v) x[r][v] = _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m256 bv[V];
    RNAN_UNROLL
    for (int v = 0; v < V; ++v)
      bv[v] = load_lanes(b + p * ldb + 8 * v, kMask && v == V - 1, mask);
    RNAN_UNROLL
    for (int r = 0; r < kGemmRows; ++r) {
      const __m256 w = _mm256_broadcast_ss(kTA ? ar[r] + p * lda : ar[r] + p);
      RNAN_UNROLL
      for (int v = 0; v < V; ++v) x[r][v] = _mm256_fmadd_ps(w, bv[v], x[r][v]);
    }
  }
}

// C[i0:i0+rv, 0:8V] (rv <= 6) = beta C + op(A) B for one register block: A element (i, p) at
// a[i lda + p] (kTA false) or a[p lda + i] (kTA true); B rows of stride ldb; kMask: the last of the V
// vectors holds only the lanes in mask (columns past n: not loaded, not stored). Rows past rv
// repeat the last valid row (computed, never stored).
template <bool kTA, int V, bool kMask>
RNAN_AVX2_INLINE void gemm_block(const float* a, int64_t lda, int64_t i0, int64_t rv, const float* b, int64_t ldb,
                                 int64_t k, __m256i mask, float beta, float* c, int64_t ldc) {
  const float* ar[kGemmRows];
  RNAN_UNROLL
  for (int r = 0; r < kGemmRows; ++r) {
    const int64_t i = i0 + std::min<int64_t>(r, rv - 1);
    ar[r] = kTA ? a + i : a + i * lda;
  }
  __m256 x[kGemmRows][V];
  block_products<kTA, V, kMask>(ar, lda, b, ldb, k, mask, x);
  RNAN_UNROLL
  for (int r = 0; r < kGemmRows; ++r) {
    if (r >= rv) break;
    float* cr = c + (i0 + r) * ldc;
    RNAN_UNROLL
    for (int v = 0; v < V; ++v) {
      const bool masked = kMask && v == V - 1;
      __m256 y = x[r][v];
      if (beta != 0.0f) {
        const __m256 old = load_lanes(cr + 8 * v, masked, mask);
        y = _mm256_fmadd_ps(_mm256_set1_ps(beta), old, y);
      }
      masked ? _mm256_maskstore_ps(cr + 8 * v, mask, y) : _mm256_storeu_ps(cr + 8 * v, y);
    }
  }
}

// Row-major C (m x n, ldc) = beta C + op(A) B, op(A) m x k (A or A^T of a row-major A, lda), B
// k x n (ldb): mm's contract with op(B) = B. Column panels outer, so that the k x 16 panel of B
// stays in L1 while the row blocks pass over it.
template <bool kTA>
RNAN_AVX2_INLINE void gemm_panels(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                  int64_t ldb, float beta, float* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < n; j0 += kGemmCols) {
    const int64_t nv = n - j0;
    const __m256i mask = lane_mask8(nv > 8 ? nv - 8 : nv);
    for (int64_t i0 = 0; i0 < m; i0 += kGemmRows) {
      const int64_t rv = std::min<int64_t>(kGemmRows, m - i0);
      if (nv >= 16) gemm_block<kTA, 2, false>(a, lda, i0, rv, b + j0, ldb, k, mask, beta, c + j0, ldc);
      else if (nv > 8) gemm_block<kTA, 2, true>(a, lda, i0, rv, b + j0, ldb, k, mask, beta, c + j0, ldc);
      else if (nv == 8) gemm_block<kTA, 1, false>(a, lda, i0, rv, b + j0, ldb, k, mask, beta, c + j0, ldc);
      else gemm_block<kTA, 1, true>(a, lda, i0, rv, b + j0, ldb, k, mask, beta, c + j0, ldc);
    }
  }
}

// gemm_panels as a function: the tile products of the AVX2 path. The fused pass 2 inlines
// gemm_panels instead: a call per 6 x 32 block of weights measured 1.58x SDPA's forward at
// N = 128², d = 32, against 1.43x inlined.
template <bool kTA>
RNAN_AVX2 void gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float beta, float* c, int64_t ldc) {
  gemm_panels<kTA>(m, n, k, a, lda, b, ldb, beta, c, ldc);
}
// The column forward fused as on the AVX-512 path, for 6 queries x 16 keys per register block:
// the scores come from block_products, pass 1 folds each block into the per-key (max, sum), pass
// 2 turns it into weights in a 6 x 32 L1 buffer and multiplies them by g with gemm_panels. Score
// blocks read packed phi^T unmasked: a key block is padded with zeros to kBlockK keys, and 16 (32)
// divides kBlockK, so keys past N give S = 0 (never used) and no load leaves the block.
constexpr int64_t kFusedKeys = 2 * kGemmCols;  // keys per weight buffer of pass 2

// 2^x on 8 lanes, exp2_f32's method (clamp to [-127, 127], round, the degree-6 polynomial, 2^k
// from the exponent bits) with FMAs: -inf gives 0, NaN passes through.
RNAN_AVX2_INLINE __m256 exp2_v8(__m256 x) {
  const __m256 c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
  const __m256 k = _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(c, k);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  RNAN_UNROLL
  for (int n = 1; n < kExp2Terms; ++n) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[n]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Pass 1 of the column forward for keys j0..j0+nj-1 (nj <= kBlockK) of one batch: col_stats_avx512's
// contract (m_j, r_j over all N queries).
RNAN_AVX2 void col_stats_avx2(const float* q_all, const float* kt, int64_t N, int64_t d, int64_t nj, float* m_out,
                              float* r_out) {
  alignas(32) float m[kBlockK], l[kBlockK];
  std::fill(m, m + kBlockK, -std::numeric_limits<float>::infinity());
  std::fill(l, l + kBlockK, 0.0f);
  const __m256 log2e = _mm256_set1_ps(kLog2e);
  __m256 v[kGemmRows][2];
  const float* q[kGemmRows];
  for (int64_t i0 = 0; i0 < N; i0 += kGemmRows) {
    const int64_t rv = std::min<int64_t>(kGemmRows, N - i0);
    block_rows(q_all + i0 * d, d, rv, q);
    for (int64_t js = 0; js < nj; js += kGemmCols) {
      block_products<false, 2, false>(q, 0, kt + js, kBlockK, d, lane_mask8(8), v);
      RNAN_UNROLL
      for (int c = 0; c < 2; ++c) {
        float *mc = m + js + 8 * c, *lc = l + js + 8 * c;
        __m256 bmax = v[0][c];
        RNAN_UNROLL
        for (int r = 1; r < kGemmRows; ++r) bmax = _mm256_max_ps(bmax, v[r][c]);  // repeated rows: harmless
        const __m256 m_old = _mm256_load_ps(mc), m_new = _mm256_max_ps(m_old, bmax);
        __m256 lv = _mm256_load_ps(lc);
        if (_mm256_movemask_ps(_mm256_cmp_ps(m_old, m_new, _CMP_LT_OQ)) != 0) {
          lv = _mm256_mul_ps(lv, exp2_v8(_mm256_mul_ps(_mm256_sub_ps(m_old, m_new), log2e)));
          _mm256_store_ps(mc, m_new);
        }
        __m256 sum = _mm256_setzero_ps();
        RNAN_UNROLL
        for (int r = 0; r < kGemmRows; ++r) {
          if (r >= rv) break;  // rows past N repeat the last query: left out of the sum
          sum = _mm256_add_ps(sum, exp2_v8(_mm256_mul_ps(_mm256_sub_ps(v[r][c], m_new), log2e)));
        }
        _mm256_store_ps(lc, _mm256_add_ps(lv, sum));
      }
    }
  }
  for (int64_t j = 0; j < nj; ++j) {
    m_out[j] = m[j];
    r_out[j] = std::log2(l[j]);
  }
}

// Pass 2 of the column forward for queries i0..i0+mi-1 (mi <= kBlockQ): col_output_avx512's
// contract. acc: scratch of at least (kBlockQ + kGemmRows) x dv (rows past mi land in its spare rows).
RNAN_AVX2 void col_output_avx2(const float* q_all, const float* kt, const float* g, const float* m, const float* r,
                               int64_t N, int64_t d, int64_t dv, int64_t i0, int64_t mi, float* acc, float* out) {
  const __m256 log2e = _mm256_set1_ps(kLog2e);
  alignas(32) float p[kGemmRows][kFusedKeys];
  __m256 v[kGemmRows][2];
  const float* q[kGemmRows];
  // Keys outer, queries inner, as on the AVX-512 path: the 32 keys' phi^T and g stay in L1.
  for (int64_t js = 0; js < N; js += kFusedKeys) {
    const int64_t nk = std::min(kFusedKeys, N - js);
    const float* kt_keys = packed_key(kt, d, js);
    const float* gj = g + js * dv;
    for (int64_t r0 = 0; r0 < mi; r0 += kGemmRows) {
      block_rows(q_all + (i0 + r0) * d, d, std::min<int64_t>(kGemmRows, mi - r0), q);
      for (int64_t h = 0; h < nk; h += kGemmCols) {
        const __m256i mk[2] = {lane_mask8(nk - h), lane_mask8(nk - h - 8)};
        block_products<false, 2, false>(q, 0, kt_keys + h, kBlockK, d, lane_mask8(8), v);
        RNAN_UNROLL
        for (int c = 0; c < 2; ++c) {
          const __m256 mv = _mm256_maskload_ps(m + js + h + 8 * c, mk[c]);
          const __m256 rvec = _mm256_maskload_ps(r + js + h + 8 * c, mk[c]);
          RNAN_UNROLL
          for (int rr = 0; rr < kGemmRows; ++rr)
            _mm256_store_ps(&p[rr][h + 8 * c], exp2_v8(_mm256_fmsub_ps(_mm256_sub_ps(v[rr][c], mv), log2e, rvec)));
        }
      }
      // acc rows += the weights (first nk keys) times g: all 6 rows, those past mi into spare rows.
      gemm_panels<false>(kGemmRows, dv, nk, &p[0][0], kFusedKeys, gj, dv, js == 0 ? 0.0f : 1.0f, acc + r0 * dv, dv);
    }
  }
  std::copy(acc, acc + mi * dv, out);
}
#endif

// The inner-loop paths, best first; one runs per process (`set_cpu_attention_isa`), read once per
// op call.
enum class Isa : int { kPortable, kAvx2, kAvx512 };

bool isa_supported(Isa isa) {
#if RNAN_HAVE_AVX512 && RNAN_HAVE_AVX2  // x86-64, GCC or Clang: both sections are compiled
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return true;
#else
  return isa == Isa::kPortable;
#endif
}
Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (isa_supported(isa)) return isa;
  return Isa::kPortable;
}
std::atomic<Isa> g_isa{best_isa()};

// Per-thread tile buffers, allocated once per parallel chunk.
struct Scratch {
  std::vector<float> s, dp, acc, acc2, vec0, vec1, vec2;
  Scratch(int64_t d, int64_t dv, bool backward)
      : s(kBlockQ * kBlockK), dp(backward ? kBlockQ * kBlockK : 0),
        acc(std::max(kBlockQ, kBlockK) * std::max(d, dv)), acc2(backward ? kBlockK * d : 0),
        vec0(kBlockK), vec1(kBlockK), vec2(kBlockK) {}
};

void store_rows(const float* acc, int64_t rows, int64_t cols, float* dst) { std::copy(acc, acc + rows * cols, dst); }

// The problem in contiguous (B, N, d) / (B, N, dv) operands.
struct Attention {
  const float *q, *k, *v;  // theta, phi, g
  int64_t B, N, d, dv;
  Isa isa;
  // Packed phi^T and g^T (B, k_blocks, d or dv, kBlockK): kt on the AVX-512 and AVX2 paths, gt on
  // the AVX2 path's backward; else nullptr.
  const float *kt, *gt;

  int64_t q_blocks() const { return (N + kBlockQ - 1) / kBlockQ; }
  int64_t k_blocks() const { return key_blocks(N); }
  const float* q_rows(int64_t b, int64_t i0) const { return q + (b * N + i0) * d; }
  const float* k_rows(int64_t b, int64_t j0) const { return k + (b * N + j0) * d; }
  const float* v_rows(int64_t b, int64_t j0) const { return v + (b * N + j0) * dv; }

  // The score tile S[i0:i0+mi, j0:j0+nj] of batch b into s (row stride kBlockK). Every pass
  // calls exactly this, so S_ij has the same bits in all of them (see the file comment).
  void scores(int64_t b, int64_t i0, int64_t mi, int64_t j0, int64_t nj, float* s) const {
#if RNAN_HAVE_AVX512
    if (isa == Isa::kAvx512) return scores_tile_avx512(q_rows(b, i0), d, kt_keys(b, j0), mi, nj, s);
#endif
#if RNAN_HAVE_AVX2
    if (isa == Isa::kAvx2) return gemm_avx2<false>(mi, nj, d, q_rows(b, i0), d, kt_keys(b, j0), kBlockK, 0.0f, s, kBlockK);
#endif
    mm(false, true, mi, nj, d, q_rows(b, i0), d, k_rows(b, j0), d, 0.0f, s, kBlockK);
  }
  // Packed phi^T (g^T) of batch b at key j0.
  const float* kt_keys(int64_t b, int64_t j0) const { return packed_key(kt + b * k_blocks() * d * kBlockK, d, j0); }
  const float* gt_keys(int64_t b, int64_t j0) const { return packed_key(gt + b * k_blocks() * dv * kBlockK, dv, j0); }
  // dP tile = dY[i0:i0+mi] g[j0:j0+nj]^T.
  void dscores(const float* dy, int64_t b, int64_t i0, int64_t mi, int64_t j0, int64_t nj, float* dp) const {
#if RNAN_HAVE_AVX2
    if (isa == Isa::kAvx2)
      return gemm_avx2<false>(mi, nj, dv, dy + (b * N + i0) * dv, dv, gt_keys(b, j0), kBlockK, 0.0f, dp, kBlockK);
#endif
    mm(false, true, mi, nj, dv, dy + (b * N + i0) * dv, dv, v_rows(b, j0), dv, 0.0f, dp, kBlockK);
  }
  // Row-major C (m x n, ldc) = beta C + op(A) B, op(A) = A or A^T (ta): the tile products.
  void product(bool ta, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
               float beta, float* c, int64_t ldc) const {
#if RNAN_HAVE_AVX2
    if (isa == Isa::kAvx2)
      return ta ? gemm_avx2<true>(m, n, k, a, lda, b, ldb, beta, c, ldc)
                : gemm_avx2<false>(m, n, k, a, lda, b, ldb, beta, c, ldc);
#endif
    mm(ta, false, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
};

// ---- forward ----------------------------------------------------------------------------------
void forward_col(const Attention& a, float* out, float* stat_m, float* stat_r) {
  const int64_t N = a.N, nk = a.k_blocks(), nq = a.q_blocks();
#if RNAN_HAVE_AVX512 && RNAN_HAVE_AVX2
  if (a.isa != Isa::kPortable) {  // the fused passes, in registers
    const bool wide = a.isa == Isa::kAvx512;
    const auto col_stats = wide ? col_stats_avx512 : col_stats_avx2;
    const auto col_output = wide ? col_output_avx512 : col_output_avx2;
    at::parallel_for(0, a.B * nk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nk, j0 = (t % nk) * kBlockK;
        col_stats(a.q_rows(b, 0), a.kt_keys(b, j0), N, a.d, std::min(kBlockK, N - j0), stat_m + b * N + j0,
                  stat_r + b * N + j0);
      }
    });
    at::parallel_for(0, a.B * nq, 1, [&](int64_t begin, int64_t end) {
      Scratch w(a.d, a.dv, false);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nq, i0 = (t % nq) * kBlockQ;
        col_output(a.q_rows(b, 0), a.kt_keys(b, 0), a.v_rows(b, 0), stat_m + b * N, stat_r + b * N, N, a.d, a.dv,
                   i0, std::min(kBlockQ, N - i0), w.acc.data(), out + (b * N + i0) * a.dv);
      }
    });
    return;
  }
#endif
  // Pass 1, key-major: (m_j, r_j) per key.
  at::parallel_for(0, a.B * nk, 1, [&](int64_t begin, int64_t end) {
    Scratch w(a.d, a.dv, false);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nk, j0 = (t % nk) * kBlockK, nj = std::min(kBlockK, N - j0);
      float *m = w.vec0.data(), *l = w.vec1.data();
      std::fill(m, m + nj, -std::numeric_limits<float>::infinity());
      std::fill(l, l + nj, 0.0f);
      for (int64_t i0 = 0; i0 < N; i0 += kBlockQ) {
        const int64_t mi = std::min(kBlockQ, N - i0);
        a.scores(b, i0, mi, j0, nj, w.s.data());
        col_stats_update(w.s.data(), mi, nj, kBlockK, m, l, w.vec2.data());
      }
      for (int64_t j = 0; j < nj; ++j) {
        stat_m[b * N + j0 + j] = m[j];
        stat_r[b * N + j0 + j] = std::log2(l[j]);
      }
    }
  });
  // Pass 2, query-major: final weights times g.
  at::parallel_for(0, a.B * nq, 1, [&](int64_t begin, int64_t end) {
    Scratch w(a.d, a.dv, false);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nq, i0 = (t % nq) * kBlockQ, mi = std::min(kBlockQ, N - i0);
      for (int64_t j0 = 0; j0 < N; j0 += kBlockK) {
        const int64_t nj = std::min(kBlockK, N - j0);
        a.scores(b, i0, mi, j0, nj, w.s.data());
        col_weights(w.s.data(), mi, nj, kBlockK, stat_m + b * N + j0, stat_r + b * N + j0);
        a.product(false, mi, a.dv, nj, w.s.data(), kBlockK,
              a.v_rows(b, j0), a.dv, j0 == 0 ? 0.0f : 1.0f, w.acc.data(), a.dv);
      }
      store_rows(w.acc.data(), mi, a.dv, out + (b * N + i0) * a.dv);
    }
  });
}

void forward_row(const Attention& a, float* out, float* stat_m, float* stat_r) {
  const int64_t N = a.N, nq = a.q_blocks(), dv = a.dv;
  at::parallel_for(0, a.B * nq, 1, [&](int64_t begin, int64_t end) {
    Scratch w(a.d, dv, false);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nq, i0 = (t % nq) * kBlockQ, mi = std::min(kBlockQ, N - i0);
      float *m = w.vec0.data(), *l = w.vec1.data(), *acc = w.acc.data();
      std::fill(m, m + mi, -std::numeric_limits<float>::infinity());
      std::fill(l, l + mi, 0.0f);
      std::fill(acc, acc + mi * dv, 0.0f);
      for (int64_t j0 = 0; j0 < N; j0 += kBlockK) {
        const int64_t nj = std::min(kBlockK, N - j0);
        a.scores(b, i0, mi, j0, nj, w.s.data());
        row_online(w.s.data(), mi, nj, kBlockK, m, l, acc, dv);
        a.product(false, mi, dv, nj, w.s.data(), kBlockK,
              a.v_rows(b, j0), dv, 1.0f, acc, dv);
      }
      for (int64_t i = 0; i < mi; ++i) {
        const float inv = 1.0f / l[i];
        for (int64_t c = 0; c < dv; ++c) acc[i * dv + c] *= inv;
        stat_m[b * N + i0 + i] = m[i];
        stat_r[b * N + i0 + i] = std::log2(l[i]);
      }
      store_rows(acc, mi, dv, out + (b * N + i0) * dv);
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------
// partial: nullptr, or room for (k_blocks, B, N, d) fp32 (see kPartialBudget): the key-major pass
// then also writes each key block's share dS_{:,J} phi_J of dTheta, summed over J afterwards in
// a fixed order, instead of a query-major pass that recomputes S, P, dP and dS (2 of the 8 gemms
// and 1 of the 3 exps per score).
void backward_col(const Attention& a, const float* dy, const float* stat_m, const float* stat_r, float* D, float* dq,
                  float* dk, float* dv_out, float* partial) {
  const int64_t N = a.N, nk = a.k_blocks(), nq = a.q_blocks(), d = a.d, dv = a.dv;
  // Key-major: dG_J, D_J, dPhi_J (and dTheta's shares).
  at::parallel_for(0, a.B * nk, 1, [&](int64_t begin, int64_t end) {
    Scratch w(d, dv, true);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nk, j0 = (t % nk) * kBlockK, nj = std::min(kBlockK, N - j0);
      const float *m = stat_m + b * N + j0, *r = stat_r + b * N + j0;
      float *dg = w.acc.data(), *dphi = w.acc2.data(), *Dj = D + b * N + j0;
      for (int64_t i0 = 0; i0 < N; i0 += kBlockQ) {
        const int64_t mi = std::min(kBlockQ, N - i0);
        a.scores(b, i0, mi, j0, nj, w.s.data());
        col_weights(w.s.data(), mi, nj, kBlockK, m, r);
        a.product(true, nj, dv, mi, w.s.data(), kBlockK,
              dy + (b * N + i0) * dv, dv, i0 == 0 ? 0.0f : 1.0f, dg, dv);
      }
      const float* g = a.v_rows(b, j0);
      for (int64_t j = 0; j < nj; ++j) {
        float sum = 0.0f;
        for (int64_t c = 0; c < dv; ++c) sum += g[j * dv + c] * dg[j * dv + c];
        Dj[j] = sum;
      }
      store_rows(dg, nj, dv, dv_out + (b * N + j0) * dv);
      for (int64_t i0 = 0; i0 < N; i0 += kBlockQ) {
        const int64_t mi = std::min(kBlockQ, N - i0);
        a.scores(b, i0, mi, j0, nj, w.s.data());
        col_weights(w.s.data(), mi, nj, kBlockK, m, r);
        a.dscores(dy, b, i0, mi, j0, nj, w.dp.data());
        ds_col(w.s.data(), w.dp.data(), mi, nj, kBlockK, Dj);
        a.product(true, nj, d, mi, w.s.data(), kBlockK, a.q_rows(b, i0), d, i0 == 0 ? 0.0f : 1.0f, dphi, d);
        if (partial != nullptr)
          a.product(false, mi, d, nj, w.s.data(), kBlockK, a.k_rows(b, j0), d, 0.0f,
             partial + (((t % nk) * a.B + b) * N + i0) * d, d);
      }
      store_rows(dphi, nj, d, dk + (b * N + j0) * d);
    }
  });
  if (partial != nullptr) {
    const int64_t total = a.B * N * d;
    at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
      std::copy(partial + begin, partial + end, dq + begin);
      for (int64_t jb = 1; jb < nk; ++jb) {
        const float* src = partial + jb * total;
        for (int64_t e = begin; e < end; ++e) dq[e] += src[e];
      }
    });
    return;
  }
  // Query-major: dTheta_I.
  at::parallel_for(0, a.B * nq, 1, [&](int64_t begin, int64_t end) {
    Scratch w(d, dv, true);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nq, i0 = (t % nq) * kBlockQ, mi = std::min(kBlockQ, N - i0);
      for (int64_t j0 = 0; j0 < N; j0 += kBlockK) {
        const int64_t nj = std::min(kBlockK, N - j0);
        a.scores(b, i0, mi, j0, nj, w.s.data());
        col_weights(w.s.data(), mi, nj, kBlockK, stat_m + b * N + j0, stat_r + b * N + j0);
        a.dscores(dy, b, i0, mi, j0, nj, w.dp.data());
        ds_col(w.s.data(), w.dp.data(), mi, nj, kBlockK, D + b * N + j0);
        a.product(false, mi, d, nj, w.s.data(), kBlockK,
              a.k_rows(b, j0), d, j0 == 0 ? 0.0f : 1.0f, w.acc.data(), d);
      }
      store_rows(w.acc.data(), mi, d, dq + (b * N + i0) * d);
    }
  });
}

void backward_row(const Attention& a, const float* dy, const float* stat_m, const float* stat_r, float* D, float* dq,
                  float* dk, float* dv_out) {
  const int64_t N = a.N, nk = a.k_blocks(), nq = a.q_blocks(), d = a.d, dv = a.dv;
  // Query-major: D_I (loop 1), dTheta_I (loop 2).
  at::parallel_for(0, a.B * nq, 1, [&](int64_t begin, int64_t end) {
    Scratch w(d, dv, true);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nq, i0 = (t % nq) * kBlockQ, mi = std::min(kBlockQ, N - i0);
      const float *m = stat_m + b * N + i0, *r = stat_r + b * N + i0;
      float* Di = D + b * N + i0;
      std::fill(Di, Di + mi, 0.0f);
      for (int64_t j0 = 0; j0 < N; j0 += kBlockK) {
        const int64_t nj = std::min(kBlockK, N - j0);
        a.scores(b, i0, mi, j0, nj, w.s.data());
        row_weights(w.s.data(), mi, nj, kBlockK, m, r);
        a.dscores(dy, b, i0, mi, j0, nj, w.dp.data());
        row_dot_add(w.s.data(), w.dp.data(), mi, nj, kBlockK, Di);
      }
      for (int64_t j0 = 0; j0 < N; j0 += kBlockK) {
        const int64_t nj = std::min(kBlockK, N - j0);
        a.scores(b, i0, mi, j0, nj, w.s.data());
        row_weights(w.s.data(), mi, nj, kBlockK, m, r);
        a.dscores(dy, b, i0, mi, j0, nj, w.dp.data());
        ds_row(w.s.data(), w.dp.data(), mi, nj, kBlockK, Di);
        a.product(false, mi, d, nj, w.s.data(), kBlockK,
              a.k_rows(b, j0), d, j0 == 0 ? 0.0f : 1.0f, w.acc.data(), d);
      }
      store_rows(w.acc.data(), mi, d, dq + (b * N + i0) * d);
    }
  });
  // Key-major: dG_J and dPhi_J.
  at::parallel_for(0, a.B * nk, 1, [&](int64_t begin, int64_t end) {
    Scratch w(d, dv, true);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nk, j0 = (t % nk) * kBlockK, nj = std::min(kBlockK, N - j0);
      float *dg = w.acc.data(), *dphi = w.acc2.data();
      for (int64_t i0 = 0; i0 < N; i0 += kBlockQ) {
        const int64_t mi = std::min(kBlockQ, N - i0);
        const float beta = i0 == 0 ? 0.0f : 1.0f;
        a.scores(b, i0, mi, j0, nj, w.s.data());
        row_weights(w.s.data(), mi, nj, kBlockK, stat_m + b * N + i0, stat_r + b * N + i0);
        a.product(true, nj, dv, mi, w.s.data(), kBlockK,
              dy + (b * N + i0) * dv, dv, beta, dg, dv);
        a.dscores(dy, b, i0, mi, j0, nj, w.dp.data());
        ds_row(w.s.data(), w.dp.data(), mi, nj, kBlockK, D + b * N + i0);
        a.product(true, nj, d, mi, w.s.data(), kBlockK,
              a.q_rows(b, i0), d, beta, dphi, d);
      }
      store_rows(dg, nj, dv, dv_out + (b * N + j0) * dv);
      store_rows(dphi, nj, d, dk + (b * N + j0) * d);
    }
  });
}

// ---- the ops ----------------------------------------------------------------------------------
bool column_mode(std::string_view softmax_over) {
  TORCH_CHECK(softmax_over == "query" || softmax_over == "key",
              "rnan_fast::nonlocal_attention: softmax_over must be 'query' (official RNAN) or 'key', got '",
              std::string(softmax_over), "'");
  return softmax_over == "query";
}

void check_inputs(const char* op, const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g) {
  const std::pair<const char*, const at::Tensor*> named[] = {{"theta", &theta}, {"phi", &phi}, {"g", &g}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->dim() == 3, op, ": ", name, " must be (B, N, d), got shape ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " is on ", t->device(),
                "; this kernel takes CPU tensors (CUDA tensors use the Triton kernel)");
    TORCH_CHECK(t->scalar_type() == theta.scalar_type(), op, ": dtypes differ: theta is ", theta.scalar_type(),
                " but ", name, " is ", t->scalar_type());
  }
  TORCH_CHECK(theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kBFloat16, op,
              ": unsupported dtype ", theta.scalar_type(), " (expected float32 or bfloat16)");
  TORCH_CHECK(theta.sizes() == phi.sizes(), op, ": theta ", theta.sizes(), " and phi ", phi.sizes(),
              " must have one shape");
  TORCH_CHECK(g.size(0) == theta.size(0) && g.size(1) == theta.size(1), op, ": g ", g.sizes(),
              " must share (B, N) with theta ", theta.sizes());
}

// fp32 contiguous operands: the inputs themselves when they already are, else one O(N d) copy
// (bf16 is widened here; its products are exact in fp32, so only the accumulation order differs
// from a bf16 dot, and MKL's bf16 gemm measured slower than its sgemm at these tile shapes).
at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// (B, N, c) -> (B, key blocks, c, kBlockK), zero past N: the packed transpose of kt and gt.
at::Tensor packed_transpose(const at::Tensor& t) {
  const int64_t B = t.size(0), N = t.size(1), c = t.size(2), nk = key_blocks(N);
  return at::constant_pad_nd(t, {0, 0, 0, nk * kBlockK - N}).view({B, nk, kBlockK, c}).transpose(2, 3).contiguous();
}

// The problem on path isa; kt (packed phi^T) is defined on the AVX-512 and AVX2 paths, gt (packed
// g^T) on the AVX2 path's backward.
Attention problem(Isa isa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kt,
                  const at::Tensor& gt) {
  return {q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(), q.size(0), q.size(1),
          q.size(2), v.size(2), isa, kt.defined() ? kt.const_data_ptr<float>() : nullptr,
          gt.defined() ? gt.const_data_ptr<float>() : nullptr};
}

// r (contiguous fp32) in empty_like(like)'s layout and dtype, the rule of the op's fakes.
at::Tensor like(const at::Tensor& like_t, const at::Tensor& r) {
  at::Tensor out = at::empty_like(like_t);
  if (out.is_contiguous() && out.scalar_type() == r.scalar_type()) return r;
  return out.copy_(r);
}

std::tuple<at::Tensor, at::Tensor> nonlocal_attention_fwd_cpu(const at::Tensor& theta, const at::Tensor& phi,
                                                              const at::Tensor& g, std::string_view softmax_over) {
  check_inputs("rnan_fast::nonlocal_attention_fwd", theta, phi, g);
  const bool col = column_mode(softmax_over);
  const int64_t B = theta.size(0), N = theta.size(1);
  at::Tensor out = at::empty({B, N, g.size(2)}, g.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({2, B, N}, theta.options().dtype(at::kFloat));
  if (B * N > 0) {
    const Isa isa = g_isa.load();
    const at::Tensor q = f32(theta), k = f32(phi), v = f32(g);
    const at::Tensor kt = isa == Isa::kPortable ? at::Tensor() : packed_transpose(k);
    const Attention a = problem(isa, q, k, v, kt, at::Tensor());
    float* m = stats.data_ptr<float>();
    (col ? forward_col : forward_row)(a, out.data_ptr<float>(), m, m + B * N);
  }
  return {out.to(g.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nonlocal_attention_bwd_cpu(const at::Tensor& dout,
                                                                          const at::Tensor& theta,
                                                                          const at::Tensor& phi, const at::Tensor& g,
                                                                          const at::Tensor& stats,
                                                                          std::string_view softmax_over) {
  constexpr const char* op = "rnan_fast::nonlocal_attention_bwd";
  check_inputs(op, theta, phi, g);
  const bool col = column_mode(softmax_over);
  const int64_t B = theta.size(0), N = theta.size(1);
  TORCH_CHECK(dout.sizes() == g.sizes() && dout.scalar_type() == g.scalar_type() && dout.device() == g.device(), op,
              ": dout (", dout.sizes(), ", ", dout.scalar_type(), ") must match g (", g.sizes(), ", ",
              g.scalar_type(), ")");
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == 2 && stats.size(1) == B && stats.size(2) == N &&
                  stats.scalar_type() == at::kFloat && stats.device().is_cpu(),
              op, ": stats must be the forward's (2, B, N) float32 CPU tensor, got ", stats.sizes(), " ",
              stats.scalar_type());
  const auto f32_options = theta.options().dtype(at::kFloat);
  at::Tensor dq = at::empty(theta.sizes(), f32_options), dk = at::empty(phi.sizes(), f32_options);
  at::Tensor dv = at::empty(g.sizes(), f32_options);
  if (B * N > 0) {
    const at::Tensor q = f32(theta), k = f32(phi), v = f32(g), dy = f32(dout), st = stats.contiguous();
    const Isa isa = g_isa.load();
    const at::Tensor kt = isa == Isa::kPortable ? at::Tensor() : packed_transpose(k);
    const at::Tensor gt = isa == Isa::kAvx2 ? packed_transpose(v) : at::Tensor();
    at::Tensor D = at::empty({B, N}, f32_options);
    const Attention a = problem(isa, q, k, v, kt, gt);
    const float* m = st.const_data_ptr<float>();
    if (col) {
      const int64_t partial_numel = a.k_blocks() * B * N * a.d;
      at::Tensor partial = partial_numel * 4 <= kPartialBudget ? at::empty({partial_numel}, f32_options) : at::Tensor();
      backward_col(a, dy.const_data_ptr<float>(), m, m + B * N, D.data_ptr<float>(), dq.data_ptr<float>(),
                   dk.data_ptr<float>(), dv.data_ptr<float>(), partial.defined() ? partial.data_ptr<float>() : nullptr);
    } else {
      backward_row(a, dy.const_data_ptr<float>(), m, m + B * N, D.data_ptr<float>(), dq.data_ptr<float>(),
                   dk.data_ptr<float>(), dv.data_ptr<float>());
    }
  }
  return {like(theta, dq), like(phi, dk), like(g, dv)};
}

}  // namespace

namespace {
constexpr std::pair<Isa, const char*> kIsaNames[] = {
    {Isa::kAvx512, "avx512"}, {Isa::kAvx2, "avx2"}, {Isa::kPortable, "portable"}};
}  // namespace

std::string cpu_attention_isa() {
  for (const auto& [isa, name] : kIsaNames)
    if (isa == g_isa.load()) return name;
  return "portable";
}

void set_cpu_attention_isa(const std::string& name) {
  for (const auto& [isa, known] : kIsaNames) {
    if (name != known) continue;
    TORCH_CHECK(isa_supported(isa), "set_cpu_attention_isa: this CPU (or build) lacks ",
                isa == Isa::kAvx512 ? "AVX-512F/DQ" : "AVX2/FMA", " for '", name, "'");
    g_isa.store(isa);
    return;
  }
  TORCH_CHECK(false, "set_cpu_attention_isa: expected 'avx512', 'avx2' or 'portable', got '", name, "'");
}

TORCH_LIBRARY_FRAGMENT(rnan_fast, m) {
  m.set_python_module("rnan_fast.ops.nonlocal_attention");
  m.def("nonlocal_attention_fwd(Tensor theta, Tensor phi, Tensor g, str softmax_over) -> (Tensor, Tensor)");
  m.def("nonlocal_attention_bwd(Tensor dout, Tensor theta, Tensor phi, Tensor g, Tensor stats, str softmax_over)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnan_fast, CPU, m) {
  m.impl("nonlocal_attention_fwd", &nonlocal_attention_fwd_cpu);
  m.impl("nonlocal_attention_bwd", &nonlocal_attention_bwd_cpu);
}

}  // namespace rnan_fast
