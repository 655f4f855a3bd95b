// Decoding attention over the engine's slot cache, for CPUs (bot/engine/cpu_attention.py says why).
//
// One call per layer and step: for each row i it writes the row's new key/value at position
// ends[i]-1 of slot slots[i], then attends the row's query over positions 0..ends[i]-1 of that
// slot, reading keys and values where they lie (float32 or bfloat16, widened in registers).
// Rows x heads are shared out over PyTorch's own OpenMP threads (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Lane j of the result is the sum of the 16 lanes of v[j].
inline __m512 sum16(const __m512* v) {
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

template <typename T>
inline __m512 dot16(const float* q, const T* key, int64_t dim) {
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), load16(key));
  for (int64_t d = 16; d < dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(key + d), acc);
  return acc;
}
#endif

template <typename T>
void scores_of(const float* q, const T* keys, int64_t length, int64_t dim, float scale, float* scores) {
  int64_t p = 0;
#if defined(__AVX512F__)
  if (dim % 16 == 0) {
    const __m512 scale16 = _mm512_set1_ps(scale);
    __m512 acc[16];
    for (; p + 16 <= length; p += 16) {
      for (int j = 0; j < 16; ++j) acc[j] = dot16(q, keys + (p + j) * dim, dim);
      _mm512_storeu_ps(scores + p, _mm512_mul_ps(sum16(acc), scale16));
    }
    for (; p < length; ++p) scores[p] = _mm512_reduce_add_ps(dot16(q, keys + p * dim, dim)) * scale;
  }
#endif
  for (; p < length; ++p) {
    float dot = 0.f;
    for (int64_t d = 0; d < dim; ++d) dot += q[d] * widen(keys[p * dim + d]);
    scores[p] = dot * scale;
  }
}

template <typename T>
void weigh_values(const float* scores, const T* values, int64_t length, int64_t dim, float* out) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 64 <= dim; d += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t p = 0; p < length; ++p) {
      const T* value = values + p * dim + d;
      const __m512 w = _mm512_set1_ps(scores[p]);
      a0 = _mm512_fmadd_ps(w, load16(value), a0);
      a1 = _mm512_fmadd_ps(w, load16(value + 16), a1);
      a2 = _mm512_fmadd_ps(w, load16(value + 32), a2);
      a3 = _mm512_fmadd_ps(w, load16(value + 48), a3);
    }
    _mm512_storeu_ps(out + d, a0); _mm512_storeu_ps(out + d + 16, a1);
    _mm512_storeu_ps(out + d + 32, a2); _mm512_storeu_ps(out + d + 48, a3);
  }
  for (; d + 16 <= dim; d += 16) {
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t p = 0; p < length; ++p) a0 = _mm512_fmadd_ps(_mm512_set1_ps(scores[p]), load16(values + p * dim + d), a0);
    _mm512_storeu_ps(out + d, a0);
  }
#endif
  for (; d < dim; ++d) {
    float sum = 0.f;
    for (int64_t p = 0; p < length; ++p) sum += scores[p] * widen(values[p * dim + d]);
    out[d] = sum;
  }
}

template <typename T>
void attend(const float* q, const T* keys, const T* values, int64_t length, int64_t dim,
            float scale, float* scores, float* out) {
  scores_of(q, keys, length, dim, scale, scores);
  float best = scores[0];
  for (int64_t p = 1; p < length; ++p) best = scores[p] > best ? scores[p] : best;
  float total = 0.f;
  for (int64_t p = 0; p < length; ++p) scores[p] = std::exp(scores[p] - best);
  for (int64_t p = 0; p < length; ++p) total += scores[p];
  const float inverse = 1.f / total;
  for (int64_t p = 0; p < length; ++p) scores[p] *= inverse;
  weigh_values(scores, values, length, dim, out);
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys,
         at::Tensor& values, const std::vector<int64_t>& slots, const std::vector<int64_t>& ends,
         double scale, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t slot_stride = keys.stride(0), head_stride = keys.stride(1);
  T* key_data = keys.data_ptr<T>();
  T* value_data = values.data_ptr<T>();
  const float* q_data = q.data_ptr<float>();
  const T* k_data = k.data_ptr<T>();
  const T* v_data = v.data_ptr<T>();
  float* out_data = out.data_ptr<float>();
  int64_t longest = 0;
  for (auto e : ends) longest = std::max(longest, e);
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest + 16);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / heads, head = i % heads, length = ends[row];
      const int64_t offset = slots[row] * slot_stride + head * head_stride;
      T* row_keys = key_data + offset;
      T* row_values = value_data + offset;
      std::memcpy(row_keys + (length - 1) * dim, k_data + i * dim, dim * sizeof(T));
      std::memcpy(row_values + (length - 1) * dim, v_data + i * dim, dim * sizeof(T));
      attend<T>(q_data + i * dim, row_keys, row_values, length, dim, static_cast<float>(scale),
                scores.data(), out_data + i * dim);
    }
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor keys, at::Tensor values, std::vector<int64_t> slots,
                            std::vector<int64_t> ends, double scale) {
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
                  static_cast<int64_t>(ends.size()) == rows,
              "one slot and one end per row");
  for (int64_t row = 0; row < rows; ++row) {
    TORCH_CHECK(slots[row] >= 0 && slots[row] < keys.size(0), "slot out of range");
    TORCH_CHECK(ends[row] >= 1 && ends[row] <= capacity, "end out of range");
  }
  auto query = q.to(at::kFloat).contiguous();
  auto new_keys = k.to(keys.scalar_type()).contiguous();
  auto new_values = v.to(keys.scalar_type()).contiguous();
  auto out = at::empty(query.sizes(), query.options());
  if (keys.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(query, new_keys, new_values, keys, values, slots, ends, scale, out);
  } else {
    run<float>(query, new_keys, new_values, keys, values, slots, ends, scale, out);
  }
  return out;
}
