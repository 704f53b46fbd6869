// Decode-shape sparse linear layer: y[b, r] = sum_j W[r, j] x[b, j] for a few activation rows,
// computed from the compressed weight (kept values + a row-major bitmask, or N:M values +
// packed in-group indices) without ever forming a dense weight.
//
// One row kernel per path, each taking a row's mask bytes, its kept values and the activations
// (fp32, [batch, in]) and returning the row's `batch` dot products:
//   - avx512:  AVX-512F / BW / VBMI2 masked expand-load (_mm512_maskz_expandloadu_ps/_epi16)
//              decompresses 16 (fp32) or 32 (bf16) weights per instruction into registers.
//   - avx2:    an 8-bit mask -> permutation table: load 8 consecutive kept values, move each
//              to its lane with _mm256_permutevar8x32_ps, zero the dropped lanes.
//   - scalar:  plain C++ over the set bits (ARM and every other CPU).
// The path is chosen in Python from what the CPU reports (cpu_paths below); the intrinsics are
// compiled with __attribute__((target(...))) so one binary serves every x86 CPU.
// Output rows are split over threads with at::parallel_for.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SAFE_LLM_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxBatch = 8;  // decode shapes; more rows go to the tiled dense GEMM

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// ---------------------------------------------------------------- portable path (plain C++)

// Accumulates the mask bytes [first, last) of a row into acc; returns the values consumed.
template <typename V>
int64_t row_scalar_span(const uint8_t* mask, int64_t first, int64_t last, const V* v,
                        const float* x, int64_t in, int64_t batch, float* acc) {
  const V* start = v;
  for (int64_t k = first; k < last; ++k) {
    unsigned m = mask[k];
    while (m) {
      const int j = __builtin_ctz(m);
      const float w = to_float(*v++);
      for (int64_t b = 0; b < batch; ++b) acc[b] += w * x[b * in + 8 * k + j];
      m &= m - 1;
    }
  }
  return v - start;
}

template <typename V>
void row_scalar(const uint8_t* mask, int64_t in, const V* v, const float* x, int64_t batch,
                float* acc) {
  for (int64_t b = 0; b < batch; ++b) acc[b] = 0.f;
  row_scalar_span(mask, 0, (in + 7) / 8, v, x, in, batch, acc);
}

#ifdef SAFE_LLM_X86
// ---------------------------------------------------------------- avx2 path (x86 portable)

struct PermTable {
  alignas(32) int32_t perm[256][8];  // lane j of mask m takes kept value popcount(m & (2^j - 1))
  alignas(32) int32_t lanes[256][8];  // all ones in the lanes mask m keeps, zeros elsewhere
  PermTable() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0, k = 0; j < 8; ++j) {
        lanes[m][j] = (m >> j) & 1 ? -1 : 0;
        perm[m][j] = (m >> j) & 1 ? k++ : 0;
      }
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

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 s) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// The 8 weights of mask byte m, decompressed from the next popcount(m) kept values.
template <typename V>
__attribute__((target("avx2,fma"))) inline __m256 expand8(unsigned m, const V* v) {
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.perm[m]));
  const __m256 lanes = _mm256_load_ps(reinterpret_cast<const float*>(kPerm.lanes[m]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(load8(v), perm), lanes);
}

// Four mask bytes per step, their value offsets from one 32-bit popcount each (no chain
// through the values pointer); A independent accumulators per activation row hide the FMA
// latency. Reads up to 7 values past the row's last kept one: the values buffer is padded.
template <int B, typename V>
__attribute__((target("avx2,fma,popcnt"))) void row_avx2(const uint8_t* mask, int64_t in,
                                                          const V* v, const float* x,
                                                          float* acc) {
  constexpr int A = B == 1 ? 4 : (B == 2 ? 2 : 1);
  __m256 sum[B][A];
  for (int b = 0; b < B; ++b)
    for (int a = 0; a < A; ++a) sum[b][a] = _mm256_setzero_ps();
  const int64_t full = in / 8, quads = full / 4 * 4;
  for (int64_t k = 0; k < quads; k += 4) {
    uint32_t m4;
    std::memcpy(&m4, mask + k, 4);
    const int offset[4] = {0, __builtin_popcount(m4 & 0xFFu), __builtin_popcount(m4 & 0xFFFFu),
                           __builtin_popcount(m4 & 0xFFFFFFu)};
    for (int q = 0; q < 4; ++q) {
      const __m256 w = expand8((m4 >> (8 * q)) & 0xFFu, v + offset[q]);
      for (int b = 0; b < B; ++b)
        sum[b][q % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * in + 8 * (k + q)),
                                        sum[b][q % A]);
    }
    v += __builtin_popcount(m4);
  }
  for (int64_t k = quads; k < full; ++k) {
    const __m256 w = expand8(mask[k], v);
    for (int b = 0; b < B; ++b)
      sum[b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * in + 8 * k), sum[b][0]);
    v += __builtin_popcount(mask[k]);
  }
  for (int b = 0; b < B; ++b) {
    for (int a = 1; a < A; ++a) sum[b][0] = _mm256_add_ps(sum[b][0], sum[b][a]);
    acc[b] = hsum256(sum[b][0]);
  }
  row_scalar_span(mask, full, (in + 7) / 8, v, x, in, B, acc);  // a last partial byte
}

// ---------------------------------------------------------------- avx512 path (VBMI2 expand)

template <int B>
__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt"))) void row_avx512(
    const uint8_t* mask, int64_t in, const float* v, const float* x, float* acc) {
  __m512 sum[B];
  for (int b = 0; b < B; ++b) sum[b] = _mm512_setzero_ps();
  const int64_t full = (in / 16) * 2;  // mask bytes covered by whole 16-weight steps
  for (int64_t k = 0; k < full; k += 2) {
    uint16_t m;
    std::memcpy(&m, mask + k, 2);
    const __m512 w = _mm512_maskz_expandloadu_ps(m, v);  // AVX-512F
    v += __builtin_popcount(m);
    for (int b = 0; b < B; ++b)
      sum[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * in + 8 * k), sum[b]);
  }
  for (int b = 0; b < B; ++b) acc[b] = _mm512_reduce_add_ps(sum[b]);
  row_scalar_span(mask, full, (in + 7) / 8, v, x, in, B, acc);
}

template <int B>
__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt"))) void row_avx512(
    const uint8_t* mask, int64_t in, const c10::BFloat16* v, const float* x, float* acc) {
  __m512 sum[B];
  for (int b = 0; b < B; ++b) sum[b] = _mm512_setzero_ps();
  const int64_t full = (in / 32) * 4;  // mask bytes covered by whole 32-weight steps
  for (int64_t k = 0; k < full; k += 4) {
    uint32_t m;
    std::memcpy(&m, mask + k, 4);
    const __m512i w16 = _mm512_maskz_expandloadu_epi16(m, v);  // VBMI2
    v += __builtin_popcount(m);
    const __m512 lo = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w16)), 16));
    const __m512 hi = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w16, 1)), 16));
    for (int b = 0; b < B; ++b) {
      sum[b] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + b * in + 8 * k), sum[b]);
      sum[b] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + b * in + 8 * k + 16), sum[b]);
    }
  }
  for (int b = 0; b < B; ++b) acc[b] = _mm512_reduce_add_ps(sum[b]);
  row_scalar_span(mask, full, (in + 7) / 8, v, x, in, B, acc);
}
#endif  // SAFE_LLM_X86

// ---------------------------------------------------------------- dispatch

enum class Path { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

template <int B, typename V>
void row_fixed(Path path, const uint8_t* mask, int64_t in, const V* v, const float* x,
               float* acc) {
#ifdef SAFE_LLM_X86
  if (path == Path::kAvx512) return row_avx512<B>(mask, in, v, x, acc);
  if (path == Path::kAvx2) return row_avx2<B>(mask, in, v, x, acc);
#endif
  row_scalar(mask, in, v, x, B, acc);
}

template <typename V>
void row_any(Path path, const uint8_t* mask, int64_t in, const V* v, const float* x,
             int64_t batch, float* acc) {
  switch (batch) {  // the batch as a template argument keeps the accumulators in registers
    case 1: return row_fixed<1>(path, mask, in, v, x, acc);
    case 2: return row_fixed<2>(path, mask, in, v, x, acc);
    case 3: return row_fixed<3>(path, mask, in, v, x, acc);
    case 4: return row_fixed<4>(path, mask, in, v, x, acc);
    case 5: return row_fixed<5>(path, mask, in, v, x, acc);
    case 6: return row_fixed<6>(path, mask, in, v, x, acc);
    case 7: return row_fixed<7>(path, mask, in, v, x, acc);
    default: return row_fixed<8>(path, mask, in, v, x, acc);
  }
}

// The mask bytes of one N:M row from its packed in-group indices: each mask byte (8 inputs,
// 8 / m groups) comes from the next `width` = (8 / m) * n * bits code bits through `table`
// (2:4: 8 bits, 4:8: 12 bits), built by nm_table.
std::vector<uint8_t> nm_table(int64_t n, int64_t m, int64_t bits) {
  const int64_t groups = 8 / m, width = groups * n * bits;
  std::vector<uint8_t> table(size_t{1} << width);
  for (uint32_t code = 0; code < table.size(); ++code) {
    unsigned set = 0;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < n; ++i) {
        const unsigned index = (code >> ((g * n + i) * bits)) & ((1u << bits) - 1);
        set |= 1u << (g * m + index);
      }
    table[code] = static_cast<uint8_t>(set);
  }
  return table;
}

void nm_row_mask(const uint8_t* codes, int64_t mask_bytes, int64_t width,
                 const uint8_t* table, uint8_t* out) {
  const uint32_t keep = (1u << width) - 1;
  for (int64_t k = 0, at = 0; k < mask_bytes; ++k, at += width) {
    uint32_t word;
    std::memcpy(&word, codes + (at >> 3), 4);  // codes rows are padded by 4 bytes
    out[k] = table[(word >> (at & 7)) & keep];
  }
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& values, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxBatch,
              "x must be [batch <= 8, in]");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "values must be float32 or bfloat16");
  TORCH_CHECK(path >= 0 && path <= 2, "path must be 0 (scalar), 1 (avx2) or 2 (avx512)");
}

// y [batch, out] for x [batch, in] (fp32): row r of W is given by row_mask(r, scratch) (a
// pointer to its mask bytes) and row_offset(r) (the index of its first kept value). Threads
// take chunks of at least ~32K weights: a small layer runs on the calling thread.
template <typename V, typename MaskFn, typename OffsetFn>
void spmm_rows(const float* x, int64_t batch, int64_t in, const V* values, int64_t out,
               int64_t mask_bytes, Path path, MaskFn row_mask, OffsetFn row_offset, float* y) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(in, 1));
  at::parallel_for(0, out, grain, [&](int64_t first, int64_t last) {
    std::vector<uint8_t> scratch(mask_bytes + 4);
    float acc[kMaxBatch];
    for (int64_t r = first; r < last; ++r) {
      row_any(path, row_mask(r, scratch.data()), in, values + row_offset(r), x, batch, acc);
      for (int64_t b = 0; b < batch; ++b) y[b * out + r] = acc[b];
    }
  });
}

template <typename MaskFn, typename OffsetFn>
torch::Tensor spmm(const torch::Tensor& x, const torch::Tensor& values, int64_t out,
                   int64_t mask_bytes, int64_t path, MaskFn row_mask, OffsetFn row_offset) {
  check_inputs(x, values, path);
  const torch::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t batch = xf.size(0), in = xf.size(1);
  TORCH_CHECK(mask_bytes == (in + 7) / 8, "x's last dimension does not match the weight");
  torch::Tensor y = torch::empty({batch, out}, xf.options());
  const auto p = static_cast<Path>(path);
  if (values.scalar_type() == at::kFloat)
    spmm_rows(xf.data_ptr<float>(), batch, in, values.data_ptr<float>(), out, mask_bytes, p,
              row_mask, row_offset, y.data_ptr<float>());
  else
    spmm_rows(xf.data_ptr<float>(), batch, in, values.data_ptr<c10::BFloat16>(), out,
              mask_bytes, p, row_mask, row_offset, y.data_ptr<float>());
  return y.to(x.scalar_type());
}

}  // namespace

// W applied to x [batch, in] (x @ W.T), W as values [nnz + pad] (row-major kept values), mask
// [out, ceil(in / 8)] uint8 (bit j % 8 of byte j / 8 of row r: W[r, j] is kept) and
// row_offsets [out + 1] int64 (index of each row's first value).
torch::Tensor bitmask_matmul(const torch::Tensor& values, const torch::Tensor& mask,
                             const torch::Tensor& row_offsets, int64_t path,
                             const torch::Tensor& x) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous(),
              "mask must be contiguous uint8 [out, ceil(in / 8)]");
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.numel() == mask.size(0) + 1,
              "row_offsets must be int64 [out + 1]");
  const uint8_t* m = mask.data_ptr<uint8_t>();
  const int64_t* off = row_offsets.data_ptr<int64_t>();
  const int64_t bytes = mask.size(1);
  return spmm(x, values, mask.size(0), bytes, path,
              [=](int64_t r, uint8_t*) { return m + r * bytes; },
              [=](int64_t r) { return off[r]; });
}

// W applied to x [batch, in] (x @ W.T), W in N:M form: values [out * in * n / m + pad] (each group's n kept
// values, ascending index) and codes [out, row_code_bytes + 4] uint8 (each group's n in-group
// indices, `bits` bits each, packed little-endian along the row).
torch::Tensor nm_matmul(const torch::Tensor& values, const torch::Tensor& codes, int64_t n,
                        int64_t m, int64_t bits, int64_t path, const torch::Tensor& x) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes must be contiguous uint8 [out, bytes]");
  TORCH_CHECK(m == 2 || m == 4 || m == 8, "N:M kernels need m in {2, 4, 8}");
  const int64_t in = x.size(-1), groups = in / m, kept = groups * n;
  TORCH_CHECK(in % 8 == 0, "N:M kernels need in % 8 == 0");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const int64_t stride = codes.size(1), width = (8 / m) * n * bits;
  TORCH_CHECK(width <= 16, "N:M pattern too wide for the decoder");
  const std::vector<uint8_t> table = nm_table(n, m, bits);
  const uint8_t* t = table.data();
  return spmm(x, values, codes.size(0), in / 8, path,
              [=](int64_t r, uint8_t* scratch) {
                nm_row_mask(c + r * stride, in / 8, width, t, scratch);
                return static_cast<const uint8_t*>(scratch);
              },
              [=](int64_t r) { return r * kept; });
}

// The paths this CPU can run, best first (the CPU's own report, no timing).
std::vector<std::string> cpu_paths() {
  std::vector<std::string> paths;
#ifdef SAFE_LLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vbmi2"))
    paths.push_back("avx512");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths.push_back("avx2");
#endif
  paths.push_back("scalar");
  return paths;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("bitmask_matmul", &bitmask_matmul, "x @ W.T, W as values + row bitmask");
  module.def("nm_matmul", &nm_matmul, "x @ W.T, W as N:M values + packed in-group indices");
  module.def("cpu_paths", &cpu_paths, "kernel paths this CPU runs, best first");
}
