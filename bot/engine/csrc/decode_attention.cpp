// Decoding attention over the engine's slot cache, for CPUs (bot/engine/cpu_attention.py says why).
//
// One call per layer and step: row i attends its query over positions 0..ends[i]-1, the first
// starts[i] of them in the row's prefix chunks (the dialogue's keys/values as the prefix cache
// keeps them, [layers, 2, heads, n, head_dim] each, in order) and the rest in slot slots[i],
// which holds position p at index p - starts[i]; the row's new key/value is written there first
// (position ends[i]-1).
// Keys and values are read where they lie (float32 or bfloat16, widened in registers: AVX-512
// or AVX2 vectors, whichever the build's -march=native has). Rows x heads are shared out over
// PyTorch's own OpenMP threads (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define VECTORISED 1
#endif

namespace {

// How many positions ahead of use a head's keys and values are asked for (prefetch). A head's
// keys or values at ~300 positions are a ~38 KB stream that the hardware prefetcher alone
// starts too late on: measured on a 2-core Zen 5, 24 layers x 1 row x 300 positions of a
// bfloat16 cache read from memory, 1.06-1.43 ms -> 0.96-1.10 ms a step in three runs (1,000
// positions: 2.66-3.41 -> 2.48-3.12 ms).
constexpr int64_t kAhead = 32;

// Ask for the cache lines of positions [from, to) (clamped to length) of one head's stream.
template <typename T>
inline void prefetch(const T* stream, int64_t from, int64_t to, int64_t length, int64_t dim) {
  to = to < length ? to : length;
  if (from >= to) return;
  const char* begin = reinterpret_cast<const char*>(stream + from * dim);
  const char* end = reinterpret_cast<const char*>(stream + to * dim);
  for (const char* line = begin; line < end; line += 64) __builtin_prefetch(line, 0, 3);
}

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

// One vector of float32 lanes: 16 with AVX-512, 8 with AVX2 (with FMA). The code below is
// written once over these; which one a build gets is what -march=native finds.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }

// Lane j of the result is the sum of the lanes of v[j].
inline Vec vsums(const Vec* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#elif defined(VECTORISED)
constexpr int64_t kLanes = 8;
using Vec = __m256;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const at::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// Lane j of the result is the sum of the lanes of v[j].
inline Vec vsums(const Vec* v) {
  // hadd pairs neighbours within each 128-bit half: after two rounds, half h of u0 holds the
  // sums of v[0..3]'s half h, u1 those of v[4..7]; adding the halves gives the whole sums.
  __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

#if defined(VECTORISED)
template <typename T>
inline Vec dot(const float* q, const T* key, int64_t dim) {
  Vec acc = vmul(vload(q), vload(key));
  for (int64_t d = kLanes; d < dim; d += kLanes) acc = vfma(vload(q + d), vload(key + d), acc);
  return acc;
}
#endif

template <typename T>
void scores_of(const float* q, const T* keys, int64_t length, int64_t dim, float scale, float* scores) {
  int64_t p = 0;
#if defined(VECTORISED)
  if (dim % kLanes == 0) {
    const Vec scales = vset(scale);
    Vec acc[kLanes];
    for (; p + kLanes <= length; p += kLanes) {
      prefetch(keys, p + kAhead, p + kAhead + kLanes, length, dim);
      for (int j = 0; j < kLanes; ++j) acc[j] = dot(q, keys + (p + j) * dim, dim);
      vstore(scores + p, vmul(vsums(acc), scales));
    }
    for (; p < length; ++p) scores[p] = vsum(dot(q, keys + p * dim, dim)) * scale;
  }
#endif
  for (; p < length; ++p) {
    float sum = 0.f;
    for (int64_t d = 0; d < dim; ++d) sum += q[d] * widen(keys[p * dim + d]);
    scores[p] = sum * scale;
  }
}

template <typename T>
void weigh_values(const float* scores, const T* values, int64_t length, int64_t dim, float* out) {
  int64_t d = 0;
#if defined(VECTORISED)
  for (; d + 4 * kLanes <= dim; d += 4 * kLanes) {
    Vec a0 = vload(out + d), a1 = vload(out + d + kLanes);
    Vec a2 = vload(out + d + 2 * kLanes), a3 = vload(out + d + 3 * kLanes);
    for (int64_t p = 0; p < length; ++p) {
      if (d == 0 && p % 8 == 0) prefetch(values, p + kAhead, p + kAhead + 8, length, dim);
      const T* value = values + p * dim + d;
      const Vec w = vset(scores[p]);
      a0 = vfma(w, vload(value), a0);
      a1 = vfma(w, vload(value + kLanes), a1);
      a2 = vfma(w, vload(value + 2 * kLanes), a2);
      a3 = vfma(w, vload(value + 3 * kLanes), a3);
    }
    vstore(out + d, a0); vstore(out + d + kLanes, a1);
    vstore(out + d + 2 * kLanes, a2); vstore(out + d + 3 * kLanes, a3);
  }
  for (; d + kLanes <= dim; d += kLanes) {
    Vec a0 = vload(out + d);
    for (int64_t p = 0; p < length; ++p) a0 = vfma(vset(scores[p]), vload(values + p * dim + d), a0);
    vstore(out + d, a0);
  }
#endif
  for (; d < dim; ++d) {
    float sum = out[d];
    for (int64_t p = 0; p < length; ++p) sum += scores[p] * widen(values[p * dim + d]);
    out[d] = sum;
  }
}

// Where one row's keys/values lie for head 0 of this layer: its prefix chunks, then its slot.
template <typename T>
struct Segment {
  const T* keys;
  const T* values;
  int64_t length;
  int64_t head_stride;
};

// Softmax(q . keys * scale) . values over the row's segments, in float32, into out.
template <typename T>
void attend(const float* q, const std::vector<Segment<T>>& segments, int64_t head, int64_t dim,
            float scale, float* scores, float* out) {
  int64_t length = 0;
  for (const auto& segment : segments) {
    const int64_t offset = head * segment.head_stride;
    prefetch(segment.keys + offset, 0, kAhead, segment.length, dim);
    scores_of(q, segment.keys + offset, segment.length, dim, scale, scores + length);
    length += segment.length;
  }
  for (const auto& segment : segments)  // read after the softmax: on their way meanwhile
    prefetch(segment.values + head * segment.head_stride, 0, kAhead, segment.length, dim);
  float best = scores[0];
  for (int64_t p = 1; p < length; ++p) best = scores[p] > best ? scores[p] : best;
  float total = 0.f;
  for (int64_t p = 0; p < length; ++p) scores[p] = std::exp(scores[p] - best);
  for (int64_t p = 0; p < length; ++p) total += scores[p];
  const float inverse = 1.f / total;
  for (int64_t p = 0; p < length; ++p) scores[p] *= inverse;
  std::memset(out, 0, dim * sizeof(float));
  length = 0;
  for (const auto& segment : segments) {
    const int64_t offset = head * segment.head_stride;
    weigh_values(scores + length, segment.values + offset, segment.length, dim, out);
    length += segment.length;
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys,
         at::Tensor& values, const std::vector<int64_t>& slots, const std::vector<int64_t>& starts,
         const std::vector<int64_t>& ends, const std::vector<std::vector<at::Tensor>>& prefixes,
         int64_t layer, double scale, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t slot_stride = keys.stride(0), head_stride = keys.stride(1);
  T* key_data = keys.data_ptr<T>();
  T* value_data = values.data_ptr<T>();
  const float* q_data = q.data_ptr<float>();
  const T* k_data = k.data_ptr<T>();
  const T* v_data = v.data_ptr<T>();
  float* out_data = out.data_ptr<float>();
  std::vector<std::vector<Segment<T>>> segments(rows);
  int64_t longest = 0;
  for (int64_t row = 0; row < rows; ++row) {
    longest = std::max(longest, ends[row]);
    for (const auto& chunk : prefixes[row]) {
      const T* base = chunk.data_ptr<T>() + layer * chunk.stride(0);
      segments[row].push_back({base, base + chunk.stride(1), chunk.size(3), chunk.stride(2)});
    }
    const int64_t offset = slots[row] * slot_stride;
    segments[row].push_back(
        {key_data + offset, value_data + offset, ends[row] - starts[row], head_stride});
  }
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest + 16);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / heads, head = i % heads, last = ends[row] - 1 - starts[row];
      const int64_t offset = slots[row] * slot_stride + head * head_stride + last * dim;
      std::memcpy(key_data + offset, k_data + i * dim, dim * sizeof(T));
      std::memcpy(value_data + offset, v_data + i * dim, dim * sizeof(T));
      attend<T>(q_data + i * dim, segments[row], head, dim, static_cast<float>(scale),
                scores.data(), out_data + i * dim);
    }
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor keys, at::Tensor values, std::vector<int64_t> slots,
                            std::vector<int64_t> starts, std::vector<int64_t> ends,
                            std::vector<std::vector<at::Tensor>> prefixes, int64_t layer,
                            double scale) {
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(),
              "keys and values must be [slots, heads, capacity, head_dim] alike");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
              "the cache must be float32 or bfloat16");
  const int64_t heads = keys.size(1), capacity = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == dim && values.strides() == keys.strides(),
              "each head's positions must lie one after another");
  TORCH_CHECK(q.dim() == 3 && q.size(1) == heads && q.size(2) == dim,
              "queries must be [rows, heads, head_dim]");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "one new key/value per query");
  const int64_t rows = q.size(0);
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == rows &&
                  static_cast<int64_t>(starts.size()) == rows &&
                  static_cast<int64_t>(ends.size()) == rows &&
                  static_cast<int64_t>(prefixes.size()) == rows,
              "one slot, start, end and prefix per row");
  for (int64_t row = 0; row < rows; ++row) {
    TORCH_CHECK(slots[row] >= 0 && slots[row] < keys.size(0), "slot out of range");
    TORCH_CHECK(starts[row] >= 0 && starts[row] < ends[row], "start out of range");
    TORCH_CHECK(ends[row] - starts[row] <= capacity, "end out of range");
    int64_t held = 0;
    for (const auto& chunk : prefixes[row]) {
      TORCH_CHECK(chunk.dim() == 5 && chunk.size(1) == 2 && chunk.size(2) == heads &&
                      chunk.size(4) == dim && layer >= 0 && layer < chunk.size(0),
                  "prefix chunks must be [layers, 2, heads, n, head_dim] of this model");
      TORCH_CHECK(chunk.scalar_type() == keys.scalar_type(), "prefix chunks in the cache's dtype");
      TORCH_CHECK(chunk.stride(4) == 1 && chunk.stride(3) == dim,
                  "each head's positions must lie one after another");
      held += chunk.size(3);
    }
    TORCH_CHECK(held == starts[row], "a row's prefix chunks must hold its first start positions");
  }
  auto query = q.to(at::kFloat).contiguous();
  auto new_keys = k.to(keys.scalar_type()).contiguous();
  auto new_values = v.to(keys.scalar_type()).contiguous();
  auto out = at::empty(query.sizes(), query.options());
  if (keys.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(query, new_keys, new_values, keys, values, slots, starts, ends, prefixes,
                      layer, scale, out);
  } else {
    run<float>(query, new_keys, new_values, keys, values, slots, starts, ends, prefixes, layer,
               scale, out);
  }
  return out;
}
