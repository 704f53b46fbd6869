// Decode-shape sparse linear layer: y[b, r] = sum_j W[r, j] x[b, j] for a few activation rows,
// computed from the compressed weight without ever forming a dense weight.
//
// Layout ("tiled bitmask", built in format.py): the rows of W are cut into tiles of 16; a tile
// is walked along the input dimension in steps of G inputs (G = 2 for bfloat16 values, 1 for
// float32), and each step has one mask word of 16 * G bits, bit G * r + i set where
// W[16 t + r, G s + i] is kept. A tile's kept values follow in the order of its set bits, so
// one expand of the step's values fills a register with the weights of 16 output rows for G
// inputs, in the lane order the multiply wants:
//   - bf16, AVX-512-BF16: lane r of _mm512_dpbf16_ps sums the pair (2r, 2r + 1) times the
//     broadcast activation pair (x[2s], x[2s + 1]) -> 16 row sums, no horizontal sum, the
//     accumulators held in registers across the whole input dimension (as SparAMX does);
//   - fp32: one _mm512_fmadd_ps against the broadcast x[s].
// Value offsets come from popcounts of the mask words (a one-add dependency chain), so the
// kernel reads each kept value and each mask bit once: its bytes are (1 - s) of dense's plus
// one bit per weight.
//
// Paths, each compiled with __attribute__((target(...))) so one binary serves every x86 CPU:
//   - avx512:      AVX-512F/BW/VBMI2: a plain 64-byte load, then the register-form expand
//                  (_mm512_maskz_expand_epi16 / _ps). AMD's Zen 4 runs the memory-source
//                  expand-load as microcode, many times slower; the register form is fast on
//                  both vendors.
//   - avx512-load: the same with the memory-source expand-load (_mm512_maskz_expandloadu_*),
//                  one instruction fewer; kept for the CPUs where it is measured faster.
//   - avx2:        an 8-bit mask -> permutation table with _mm256_permutevar8x32_ps.
//   - scalar:      plain C++ over the set bits (ARM and every other CPU).
// Which one runs is chosen in Python by measurement (kernel.py). Output tiles are split over
// threads with at::parallel_for. Prefill decompresses tiles into dense rows (decompress_tiles)
// for the dense GEMM.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SAFE_LLM_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTile = 16;     // output rows per tile
constexpr int64_t kMaxBatch = 8;  // decode shapes; more rows go to the tiled dense GEMM

enum class Path { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Load = 3 };

template <typename V>
struct StepOf;  // G inputs per step and the mask word of one tile step
template <>
struct StepOf<float> {
  static constexpr int G = 1;
  using Word = uint16_t;
};
template <>
struct StepOf<c10::BFloat16> {
  static constexpr int G = 2;
  using Word = uint32_t;
};

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// What one tile product reads: `steps` mask words, the tile's values, the activations as fp32
// [batch, steps * G] (`xf`, zero-padded) and, for the dpbf16 kernel, as bf16 pairs (`xp`,
// [batch, steps] 32-bit words). It writes out[b * 16 + r] (fp32).
template <typename V>
struct TileArgs {
  const typename StepOf<V>::Word* words;
  int64_t steps;
  const V* v;
  const float* xf;
  const uint32_t* xp;
  float* out;
};

// ---------------------------------------------------------------- portable path (plain C++)

template <typename V>
void tile_scalar(const TileArgs<V>& a, int64_t batch) {
  constexpr int G = StepOf<V>::G;
  const int64_t width = a.steps * G;
  std::fill(a.out, a.out + batch * kTile, 0.f);
  const V* v = a.v;
  for (int64_t s = 0; s < a.steps; ++s) {
    uint32_t m = a.words[s];
    while (m) {
      const int k = __builtin_ctz(m);
      const float w = to_float(*v++);
      for (int64_t b = 0; b < batch; ++b) a.out[b * kTile + k / G] += w * a.xf[b * width + G * s + k % G];
      m &= m - 1;
    }
  }
}

#ifdef SAFE_LLM_X86
// Four consecutive steps' mask words and where each step's values start: read as 64-bit
// words, so that the values pointer advances once per four steps (one add on the loop's
// dependency chain, not one popcount and add per step).
struct Quad {
  uint32_t m[4];
  int64_t first[4];
  int64_t total;
};

__attribute__((target("popcnt"))) inline Quad quad(const uint16_t* words) {
  uint64_t x;
  std::memcpy(&x, words, 8);
  Quad q;
  for (int i = 0; i < 4; ++i) q.m[i] = static_cast<uint32_t>((x >> (16 * i)) & 0xFFFFu);
  q.first[0] = 0;
  q.first[1] = __builtin_popcountll(x & 0xFFFFull);
  q.first[2] = __builtin_popcountll(x & 0xFFFFFFFFull);
  q.first[3] = __builtin_popcountll(x & 0xFFFFFFFFFFFFull);
  q.total = __builtin_popcountll(x);
  return q;
}

__attribute__((target("popcnt"))) inline Quad quad(const uint32_t* words) {
  uint64_t lo, hi;
  std::memcpy(&lo, words, 8);
  std::memcpy(&hi, words + 2, 8);
  Quad q;
  q.m[0] = static_cast<uint32_t>(lo), q.m[1] = static_cast<uint32_t>(lo >> 32);
  q.m[2] = static_cast<uint32_t>(hi), q.m[3] = static_cast<uint32_t>(hi >> 32);
  const int64_t low = __builtin_popcountll(lo);
  q.first[0] = 0;
  q.first[1] = __builtin_popcountll(lo & 0xFFFFFFFFull);
  q.first[2] = low;
  q.first[3] = low + __builtin_popcountll(hi & 0xFFFFFFFFull);
  q.total = low + __builtin_popcountll(hi);
  return q;
}

// ---------------------------------------------------------------- avx2 path (x86 portable)

// Lane j of mask byte m takes kept value popcount(m & (2^j - 1)); a dropped lane's entry has
// its sign bit set (vpermps reads only the low 3 bits), and blendv zeroes those lanes: one
// 8 KiB table, one table load per 8 weights.
struct PermTable {
  alignas(32) int32_t perm[256][8];
  PermTable() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0, k = 0; j < 8; ++j) perm[m][j] = (m >> j) & 1 ? k++ : INT32_MIN;
  }
};
const PermTable kPerm;

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* v) {
  return _mm256_loadu_ps(v);
}
__attribute__((target("avx2,fma"))) inline __m256 load8(const c10::BFloat16* v) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The 8 lanes of mask byte m, decompressed from the next popcount(m) kept values (reads 8).
template <typename V>
__attribute__((target("avx2,fma"))) inline __m256 expand8(unsigned m, const V* v) {
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.perm[m]));
  const __m256 moved = _mm256_permutevar8x32_ps(load8(v), perm);
  return _mm256_blendv_ps(moved, _mm256_setzero_ps(), _mm256_castsi256_ps(perm));
}

// fp32 (G = 1): the 16-bit word's low byte is rows 0-7, its high byte rows 8-15.
template <int B>
__attribute__((target("avx2,fma"))) inline void avx2_step(const TileArgs<float>& a, int64_t s,
                                                          uint32_t m, const float* v,
                                                          __m256* lo, __m256* hi) {
  const unsigned low = m & 0xFFu;
  const __m256 w0 = expand8(low, v), w1 = expand8(m >> 8, v + __builtin_popcount(low));
  for (int b = 0; b < B; ++b) {
    const __m256 x = _mm256_broadcast_ss(a.xf + b * a.steps + s);
    lo[b] = _mm256_fmadd_ps(w0, x, lo[b]);
    hi[b] = _mm256_fmadd_ps(w1, x, hi[b]);
  }
}

template <int B>
__attribute__((target("avx2,fma,popcnt"))) void tile_avx2(const TileArgs<float>& a) {
  constexpr int U = B == 1 ? 2 : 1;  // independent accumulator sets hide the FMA latency
  __m256 lo[U][B], hi[U][B];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < B; ++b) lo[u][b] = hi[u][b] = _mm256_setzero_ps();
  const float* v = a.v;
  int64_t s = 0;
  for (; s + 4 <= a.steps; s += 4) {
    const Quad q = quad(a.words + s);
    for (int i = 0; i < 4; ++i)
      avx2_step<B>(a, s + i, q.m[i], v + q.first[i], lo[i % U], hi[i % U]);
    v += q.total;
  }
  for (; s < a.steps; ++s) {
    avx2_step<B>(a, s, a.words[s], v, lo[0], hi[0]);
    v += __builtin_popcount(a.words[s]);
  }
  for (int b = 0; b < B; ++b) {
    for (int u = 1; u < U; ++u) {
      lo[0][b] = _mm256_add_ps(lo[0][b], lo[u][b]);
      hi[0][b] = _mm256_add_ps(hi[0][b], hi[u][b]);
    }
    _mm256_storeu_ps(a.out + b * kTile, lo[0][b]);
    _mm256_storeu_ps(a.out + b * kTile + 8, hi[0][b]);
  }
}

// bf16 (G = 2): byte q of the 32-bit word is rows 4q..4q+3, lanes (row, input) interleaved;
// times the activation pair repeated, then the pairs of lanes are summed once per tile.
template <int B>
__attribute__((target("avx2,fma,popcnt"))) void tile_avx2(const TileArgs<c10::BFloat16>& a) {
  __m256 acc[B][4];
  for (int b = 0; b < B; ++b)
    for (int q = 0; q < 4; ++q) acc[b][q] = _mm256_setzero_ps();
  const c10::BFloat16* v = a.v;
  const int64_t width = 2 * a.steps;
  for (int64_t s = 0; s < a.steps; ++s) {
    const uint32_t m = a.words[s];
    const int offset[4] = {0, __builtin_popcount(m & 0xFFu), __builtin_popcount(m & 0xFFFFu),
                           __builtin_popcount(m & 0xFFFFFFu)};
    for (int q = 0; q < 4; ++q) {
      const __m256 w = expand8((m >> (8 * q)) & 0xFFu, v + offset[q]);
      for (int b = 0; b < B; ++b) {
        const __m256 x = _mm256_castpd_ps(
            _mm256_broadcast_sd(reinterpret_cast<const double*>(a.xf + b * width + 2 * s)));
        acc[b][q] = _mm256_fmadd_ps(w, x, acc[b][q]);
      }
    }
    v += __builtin_popcount(m);
  }
  alignas(32) float lanes[8];
  for (int b = 0; b < B; ++b)
    for (int q = 0; q < 4; ++q) {
      _mm256_store_ps(lanes, acc[b][q]);
      for (int r = 0; r < 4; ++r) a.out[b * kTile + 4 * q + r] = lanes[2 * r] + lanes[2 * r + 1];
    }
}

// ---------------------------------------------------------------- avx512 paths (VBMI2 expand)

#define SAFE_LLM_AVX512 "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt"

// The register forms load first; the empty asm keeps the compiler from folding the load into
// the expand's memory-source form (which it otherwise does, at -O3).
template <bool kFromMemory>
__attribute__((target(SAFE_LLM_AVX512))) inline __m512 expand16(uint16_t m, const float* v) {
  if (kFromMemory) return _mm512_maskz_expandloadu_ps(m, v);
  __m512 loaded = _mm512_loadu_ps(v);
  asm("" : "+v"(loaded));
  return _mm512_maskz_expand_ps(m, loaded);
}

template <bool kFromMemory>
__attribute__((target(SAFE_LLM_AVX512))) inline __m512i expand32(uint32_t m, const void* v) {
  if (kFromMemory) return _mm512_maskz_expandloadu_epi16(m, v);
  __m512i loaded = _mm512_loadu_si512(v);
  asm("" : "+v"(loaded));
  return _mm512_maskz_expand_epi16(m, loaded);
}

// fp32 (G = 1): 16 rows for one input per step, four steps per block.
template <int B, bool kFromMemory>
__attribute__((target(SAFE_LLM_AVX512))) void tile_avx512(const TileArgs<float>& a) {
  constexpr int U = B == 1 ? 4 : (B == 2 ? 2 : 1);  // accumulator sets hide the FMA latency
  __m512 acc[U][B];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < B; ++b) acc[u][b] = _mm512_setzero_ps();
  const float* v = a.v;
  int64_t s = 0;
  for (; s + 4 <= a.steps; s += 4) {
    const Quad q = quad(a.words + s);
    for (int i = 0; i < 4; ++i) {
      const __m512 w = expand16<kFromMemory>(static_cast<uint16_t>(q.m[i]), v + q.first[i]);
      for (int b = 0; b < B; ++b)
        acc[i % U][b] =
            _mm512_fmadd_ps(w, _mm512_set1_ps(a.xf[b * a.steps + s + i]), acc[i % U][b]);
    }
    v += q.total;
  }
  for (; s < a.steps; ++s) {
    const uint32_t m = a.words[s];
    const __m512 w = expand16<kFromMemory>(static_cast<uint16_t>(m), v);
    v += __builtin_popcount(m);
    for (int b = 0; b < B; ++b)
      acc[0][b] = _mm512_fmadd_ps(w, _mm512_set1_ps(a.xf[b * a.steps + s]), acc[0][b]);
  }
  for (int b = 0; b < B; ++b) {
    for (int u = 1; u < U; ++u) acc[0][b] = _mm512_add_ps(acc[0][b], acc[u][b]);
    _mm512_storeu_ps(a.out + b * kTile, acc[0][b]);
  }
}

// One step of the dpbf16 kernel at values v: 16 rows x the activation pair of step s.
template <int B, bool kFromMemory>
__attribute__((target(SAFE_LLM_AVX512 ",avx512bf16"))) inline void dpbf16_step(
    const TileArgs<c10::BFloat16>& a, int64_t s, uint32_t m, const c10::BFloat16* v,
    __m512* acc) {
  const __m512bh w = (__m512bh)expand32<kFromMemory>(m, v);
  for (int b = 0; b < B; ++b) {
    const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a.xp[b * a.steps + s]));
    acc[b] = _mm512_dpbf16_ps(acc[b], w, x);
  }
}

// bf16 (G = 2) with AVX-512-BF16: one dpbf16 per step and activation row.
template <int B, bool kFromMemory>
__attribute__((target(SAFE_LLM_AVX512 ",avx512bf16"))) void tile_avx512_dpbf16(
    const TileArgs<c10::BFloat16>& a) {
  constexpr int U = B == 1 ? 4 : (B == 2 ? 2 : 1);
  __m512 acc[U][B];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < B; ++b) acc[u][b] = _mm512_setzero_ps();
  const c10::BFloat16* v = a.v;
  int64_t s = 0;
  for (; s + 4 <= a.steps; s += 4) {
    const Quad q = quad(a.words + s);
    for (int i = 0; i < 4; ++i) dpbf16_step<B, kFromMemory>(a, s + i, q.m[i], v + q.first[i], acc[i % U]);
    v += q.total;
  }
  for (; s < a.steps; ++s) {
    dpbf16_step<B, kFromMemory>(a, s, a.words[s], v, acc[0]);
    v += __builtin_popcount(a.words[s]);
  }
  for (int b = 0; b < B; ++b) {
    for (int u = 1; u < U; ++u) acc[0][b] = _mm512_add_ps(acc[0][b], acc[u][b]);
    _mm512_storeu_ps(a.out + b * kTile, acc[0][b]);
  }
}

// bf16 (G = 2) without AVX-512-BF16: the even lanes (input 2s) and the odd ones (2s + 1) of the
// expanded pairs become two fp32 vectors of the 16 rows, each times its broadcast input.
template <int B, bool kFromMemory>
__attribute__((target(SAFE_LLM_AVX512))) inline void pairs_step(
    const TileArgs<c10::BFloat16>& a, int64_t s, uint32_t m, const c10::BFloat16* v,
    __m512* acc) {
  const __m512i w = expand32<kFromMemory>(m, v);
  const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  const __m512 odd = _mm512_castsi512_ps(
      _mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  for (int b = 0; b < B; ++b) {
    const float* x = a.xf + b * 2 * a.steps + 2 * s;
    acc[b] = _mm512_fmadd_ps(even, _mm512_set1_ps(x[0]), acc[b]);
    acc[b] = _mm512_fmadd_ps(odd, _mm512_set1_ps(x[1]), acc[b]);
  }
}

template <int B, bool kFromMemory>
__attribute__((target(SAFE_LLM_AVX512))) void tile_avx512_pairs(
    const TileArgs<c10::BFloat16>& a) {
  constexpr int U = B == 1 ? 2 : 1;
  __m512 acc[U][B];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < B; ++b) acc[u][b] = _mm512_setzero_ps();
  const c10::BFloat16* v = a.v;
  int64_t s = 0;
  for (; s + 4 <= a.steps; s += 4) {
    const Quad q = quad(a.words + s);
    for (int i = 0; i < 4; ++i) pairs_step<B, kFromMemory>(a, s + i, q.m[i], v + q.first[i], acc[i % U]);
    v += q.total;
  }
  for (; s < a.steps; ++s) {
    pairs_step<B, kFromMemory>(a, s, a.words[s], v, acc[0]);
    v += __builtin_popcount(a.words[s]);
  }
  for (int b = 0; b < B; ++b) {
    for (int u = 1; u < U; ++u) acc[0][b] = _mm512_add_ps(acc[0][b], acc[u][b]);
    _mm512_storeu_ps(a.out + b * kTile, acc[0][b]);
  }
}

bool has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}
// Whether the avx512 paths multiply bf16 with dpbf16: where the CPU has it, unless a caller
// turned it off (the tests run the two-fp32-halves kernel that way on such a CPU).
std::atomic<bool> g_dpbf16{has_avx512_bf16()};

template <int B, bool kFromMemory>
void tile_avx512_any(const TileArgs<float>& a) {
  tile_avx512<B, kFromMemory>(a);
}
template <int B, bool kFromMemory>
void tile_avx512_any(const TileArgs<c10::BFloat16>& a) {
  if (g_dpbf16.load(std::memory_order_relaxed)) return tile_avx512_dpbf16<B, kFromMemory>(a);
  tile_avx512_pairs<B, kFromMemory>(a);
}
#endif  // SAFE_LLM_X86

// ---------------------------------------------------------------- dispatch

template <int B, typename V>
void tile_fixed(Path path, const TileArgs<V>& a) {
#ifdef SAFE_LLM_X86
  switch (path) {
    case Path::kAvx512: return tile_avx512_any<B, false>(a);
    case Path::kAvx512Load: return tile_avx512_any<B, true>(a);
    case Path::kAvx2: return tile_avx2<B>(a);
    default: break;
  }
#endif
  tile_scalar(a, B);
}

template <typename V>
void tile_any(Path path, const TileArgs<V>& a, int64_t batch) {
  switch (batch) {  // the batch as a template argument keeps the accumulators in registers
    case 1: return tile_fixed<1>(path, a);
    case 2: return tile_fixed<2>(path, a);
    case 3: return tile_fixed<3>(path, a);
    case 4: return tile_fixed<4>(path, a);
    case 5: return tile_fixed<5>(path, a);
    case 6: return tile_fixed<6>(path, a);
    case 7: return tile_fixed<7>(path, a);
    default: return tile_fixed<8>(path, a);
  }
}

// x [batch, in] -> fp32 [batch, steps * G], zero-padded, and for bf16 values the same as
// bf16 pairs (one 32-bit word per step: x[2s] low half, x[2s + 1] high half).
std::pair<torch::Tensor, torch::Tensor> prepare_x(const torch::Tensor& x, int64_t steps,
                                                  int64_t G) {
  const int64_t in = x.size(1), padded = steps * G;
  TORCH_CHECK(padded >= in && padded - in < G, "x's last dimension does not match the weight");
  torch::Tensor xf = x.to(at::kFloat);
  if (padded != in) xf = at::constant_pad_nd(xf, {0, padded - in});
  xf = xf.contiguous();
  torch::Tensor xp;
  if (G == 2) xp = xf.to(at::kBFloat16).contiguous();
  return {xf, xp};
}

template <typename V>
torch::Tensor spmm(const torch::Tensor& x, const torch::Tensor& values,
                   const torch::Tensor& mask, const torch::Tensor& tile_offsets, int64_t out,
                   Path path) {
  using Word = typename StepOf<V>::Word;
  constexpr int G = StepOf<V>::G;
  const int64_t tiles = mask.size(0), steps = mask.size(1) / static_cast<int64_t>(sizeof(Word));
  TORCH_CHECK(tiles == (out + kTile - 1) / kTile, "mask has the wrong number of tiles");
  auto [xf, xp] = prepare_x(x, steps, G);
  const int64_t batch = x.size(0);
  torch::Tensor y = torch::empty({batch, out}, xf.options());
  const auto* words = reinterpret_cast<const Word*>(mask.data_ptr<uint8_t>());
  const V* v = values.data_ptr<V>();
  const int64_t* off = tile_offsets.data_ptr<int64_t>();
  const float* xfp = xf.data_ptr<float>();
  const uint32_t* xpp = G == 2 ? reinterpret_cast<const uint32_t*>(xp.data_ptr()) : nullptr;
  float* yp = y.data_ptr<float>();
  // chunks of at least ~64K weights: a small layer runs on the calling thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kTile * steps * G));
  at::parallel_for(0, tiles, grain, [&](int64_t first, int64_t last) {
    alignas(64) float acc[kMaxBatch * kTile];
    for (int64_t t = first; t < last; ++t) {
      const TileArgs<V> a{words + t * steps, steps, v + off[t], xfp, xpp, acc};
      tile_any(path, a, batch);
      const int64_t rows = std::min(kTile, out - t * kTile);
      for (int64_t b = 0; b < batch; ++b)
        std::memcpy(yp + b * out + t * kTile, acc + b * kTile, rows * sizeof(float));
    }
  });
  return y.to(x.scalar_type());
}

void check_layout(const torch::Tensor& values, const torch::Tensor& mask,
                  const torch::Tensor& tile_offsets) {
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "values must be float32 or bfloat16");
  TORCH_CHECK(values.is_contiguous() && !values.is_cuda(), "values must be contiguous CPU");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous(),
              "mask must be contiguous uint8 [tiles, steps * word bytes]");
  TORCH_CHECK(tile_offsets.scalar_type() == at::kLong && tile_offsets.numel() == mask.size(0) + 1,
              "tile_offsets must be int64 [tiles + 1]");
}

template <typename V>
void decompress(const torch::Tensor& values, const torch::Tensor& mask,
                const torch::Tensor& tile_offsets, int64_t first, int64_t last, int64_t in,
                torch::Tensor& dense) {
  using Word = typename StepOf<V>::Word;
  constexpr int G = StepOf<V>::G;
  const int64_t steps = mask.size(1) / static_cast<int64_t>(sizeof(Word)), rows = dense.size(0);
  const auto* words = reinterpret_cast<const Word*>(mask.data_ptr<uint8_t>());
  const V* values_p = values.data_ptr<V>();
  const int64_t* off = tile_offsets.data_ptr<int64_t>();
  V* d = dense.data_ptr<V>();
  at::parallel_for(first, last, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const V* v = values_p + off[t];
      const Word* w = words + t * steps;
      for (int64_t s = 0; s < steps; ++s) {
        uint32_t m = w[s];
        while (m) {
          const int k = __builtin_ctz(m);
          const int64_t row = (t - first) * kTile + k / G, col = G * s + k % G;
          if (row < rows && col < in) d[row * in + col] = *v;
          ++v;
          m &= m - 1;
        }
      }
    }
  });
}

// Raw bits of one value: a weight is kept where they are not all zero (-0.0 counts).
template <typename V>
using RawOf = std::conditional_t<sizeof(V) == 4, uint32_t, uint16_t>;

template <typename V>
std::vector<torch::Tensor> compress_typed(const torch::Tensor& weight, int64_t pad) {
  using Word = typename StepOf<V>::Word;
  using Raw = RawOf<V>;
  constexpr int G = StepOf<V>::G;
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t tiles = (out + kTile - 1) / kTile, steps = (in + G - 1) / G;
  const auto* raw = reinterpret_cast<const Raw*>(weight.data_ptr());
  const V* w = weight.data_ptr<V>();
  torch::Tensor mask = torch::empty({tiles, steps * static_cast<int64_t>(sizeof(Word))},
                                    weight.options().dtype(at::kByte));
  auto* words = reinterpret_cast<Word*>(mask.data_ptr<uint8_t>());
  torch::Tensor offsets = torch::zeros({tiles + 1}, weight.options().dtype(at::kLong));
  int64_t* off = offsets.data_ptr<int64_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rows = std::min(kTile, out - t * kTile);
      int64_t count = 0;
      for (int64_t s = 0; s < steps; ++s) {
        Word word = 0;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t i = 0; i < G && G * s + i < in; ++i)
            if (raw[(t * kTile + r) * in + G * s + i] != 0) word |= Word{1} << (G * r + i);
        words[t * steps + s] = word;
        count += __builtin_popcount(word);
      }
      off[t + 1] = count;
    }
  });
  for (int64_t t = 0; t < tiles; ++t) off[t + 1] += off[t];
  torch::Tensor values = torch::zeros({off[tiles] + pad}, weight.options());
  V* v_all = values.data_ptr<V>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      V* v = v_all + off[t];
      for (int64_t s = 0; s < steps; ++s) {
        uint32_t m = words[t * steps + s];
        while (m) {
          const int k = __builtin_ctz(m);
          *v++ = w[(t * kTile + k / G) * in + G * s + k % G];
          m &= m - 1;
        }
      }
    }
  });
  return {values, mask, offsets};
}

template <typename V>
int64_t max_group_kept(const torch::Tensor& weight, int64_t m) {
  using Raw = RawOf<V>;
  const int64_t out = weight.size(0), in = weight.size(1), groups = in / m;
  const auto* raw = reinterpret_cast<const Raw*>(weight.data_ptr());
  std::vector<int64_t> row_max(out, 0);
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t most = 0;
      for (int64_t g = 0; g < groups; ++g) {
        int64_t kept = 0;
        for (int64_t j = 0; j < m; ++j) kept += raw[r * in + g * m + j] != 0;
        most = std::max(most, kept);
      }
      row_max[r] = most;
    }
  });
  return out ? *std::max_element(row_max.begin(), row_max.end()) : 0;
}

}  // namespace

// The tiled bitmask layout of a dense [out, in] weight (float32 or bfloat16; its zeros are
// the pruned entries): {values [kept + pad], mask, tile_offsets}, as format.py describes.
std::vector<torch::Tensor> compress_tiles(const torch::Tensor& weight, int64_t pad) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && !weight.is_cuda(),
              "weight must be a contiguous CPU [out, in] tensor");
  if (weight.scalar_type() == at::kFloat) return compress_typed<float>(weight, pad);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "weight must be float32 or bfloat16");
  return compress_typed<c10::BFloat16>(weight, pad);
}

// The most entries any group of m consecutive inputs keeps (in % m == 0): N:M when <= n.
int64_t group_max_kept(const torch::Tensor& weight, int64_t m) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) % m == 0,
              "weight must be contiguous [out, in] with in % m == 0");
  if (weight.scalar_type() == at::kFloat) return max_group_kept<float>(weight, m);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "weight must be float32 or bfloat16");
  return max_group_kept<c10::BFloat16>(weight, m);
}

// x [batch <= 8, in] @ W.T -> [batch, out] in x's dtype, W in the tiled bitmask layout:
// values [kept + pad] (float32 or bfloat16), mask [tiles, steps * word bytes] uint8,
// tile_offsets [tiles + 1] int64 (the index of each tile's first value).
torch::Tensor tiled_matmul(const torch::Tensor& values, const torch::Tensor& mask,
                           const torch::Tensor& tile_offsets, int64_t out, int64_t path,
                           const torch::Tensor& x) {
  check_layout(values, mask, tile_offsets);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxBatch,
              "x must be [batch <= 8, in]");
  TORCH_CHECK(path >= 0 && path <= 3, "path must be 0 (scalar) .. 3 (avx512-load)");
  const auto p = static_cast<Path>(path);
  if (values.scalar_type() == at::kFloat)
    return spmm<float>(x, values, mask, tile_offsets, out, p);
  return spmm<c10::BFloat16>(x, values, mask, tile_offsets, out, p);
}

// Rows [16 first, min(16 last, out)) of W dense, [rows, in] in the values' dtype.
torch::Tensor decompress_tiles(const torch::Tensor& values, const torch::Tensor& mask,
                               const torch::Tensor& tile_offsets, int64_t out, int64_t in,
                               int64_t first, int64_t last) {
  check_layout(values, mask, tile_offsets);
  TORCH_CHECK(0 <= first && first <= last && last <= mask.size(0), "tile range out of bounds");
  const int64_t rows = std::min(last * kTile, out) - first * kTile;
  torch::Tensor dense = torch::zeros({std::max<int64_t>(rows, 0), in}, values.options());
  if (values.scalar_type() == at::kFloat)
    decompress<float>(values, mask, tile_offsets, first, last, in, dense);
  else
    decompress<c10::BFloat16>(values, mask, tile_offsets, first, last, in, dense);
  return dense;
}

// The paths this CPU can run, fastest-expected first (the CPU's own report, no timing), and
// the features behind them.
std::vector<std::string> cpu_paths() {
  std::vector<std::string> paths;
#ifdef SAFE_LLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2")) {
    paths.push_back("avx512");
    paths.push_back("avx512-load");
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths.push_back("avx2");
#endif
  paths.push_back("scalar");
  return paths;
}

bool native_bf16() {
#ifdef SAFE_LLM_X86
  return g_dpbf16.load();
#else
  return false;
#endif
}

// Turn the dpbf16 multiply on (where the CPU has it) or off; returns the previous setting.
bool use_dpbf16(bool on) {
#ifdef SAFE_LLM_X86
  return g_dpbf16.exchange(on && has_avx512_bf16());
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("tiled_matmul", &tiled_matmul, "x @ W.T, W in the tiled bitmask layout");
  module.def("decompress_tiles", &decompress_tiles, "rows of W dense, from its tiles");
  module.def("compress_tiles", &compress_tiles, "the tiled bitmask layout of a dense weight");
  module.def("group_max_kept", &group_max_kept, "most entries kept by a group of m inputs");
  module.def("cpu_paths", &cpu_paths, "kernel paths this CPU runs");
  module.def("native_bf16", &native_bf16, "whether the avx512 paths use AVX-512-BF16 dpbf16");
  module.def("use_dpbf16", &use_dpbf16, "turn dpbf16 on (where the CPU has it) or off");
}
