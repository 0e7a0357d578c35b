// The gathered decode attention of gazeattn/ops/gaze/decode.py as one loop on CPU.
//
// For each query row p = (b, h, t) of [B, Hr, Tq] and its G query heads: the keys it attends
// are its dense rows (text and context keys, shared by the row's queries, each with its own
// validity: causal when Tq > 1) and the runs of `width` consecutive key rows its chosen
// regions split into. Each key row is read once from the cache, in place: its G scores
// (fp32), one softmax per head over the attended keys only, then each value row read once
// and added to the G outputs with its weights. Nothing is gathered into a copy.
//
// Rows address the cache's storage as a table of rows of D elements (`_row_table` in
// decode.py): keys and values share the row numbers (their tensors share strides).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

template <typename scalar_t>
inline const float* as_float(const scalar_t* row, int64_t dim, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    for (int64_t d = 0; d < dim; ++d) buffer[d] = static_cast<float>(row[d]);
    return buffer.data();
  }
}

// rows ahead of the one being read whose cache lines are fetched meanwhile: the rows are
// scattered (one run of a few keys per region), so without it each row waits on memory
constexpr int64_t kAhead = 16;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(row) + offset);
  }
}

template <typename scalar_t>
void gathered(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& dense_rows, const torch::Tensor& dense_ok,
              const torch::Tensor& run_rows, const torch::Tensor& run_ok, torch::Tensor& out,
              int64_t width, double scale) {
  const int64_t batch = q.size(0), hr = q.size(1), tq = q.size(2), group = q.size(3),
                dim = q.size(4);
  const int64_t n_dense = dense_rows.size(2), n_runs = run_rows.size(3);
  const int64_t ok_tq = dense_ok.size(1);
  const float* q_ptr = q.data_ptr<float>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  const int64_t* dense_ptr = dense_rows.data_ptr<int64_t>();
  const bool* dense_ok_ptr = dense_ok.data_ptr<bool>();
  const int64_t* runs_ptr = run_rows.data_ptr<int64_t>();
  const bool* run_ok_ptr = run_ok.data_ptr<bool>();
  float* out_ptr = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * hr * tq, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows;
    std::vector<float> scores, k_row(dim), v_row(dim);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t t = p % tq, bh = p / tq, b = bh / hr;
      // the rows this query attends: its valid dense keys, then its chosen regions' runs
      rows.clear();
      const int64_t* dense = dense_ptr + bh * n_dense;
      const bool* dense_valid = dense_ok_ptr + (b * ok_tq + (ok_tq > 1 ? t : 0)) * n_dense;
      for (int64_t m = 0; m < n_dense; ++m) {
        if (dense_valid[m]) rows.push_back(dense[m]);
      }
      const int64_t* runs = runs_ptr + p * n_runs;
      const bool* runs_valid = run_ok_ptr + p * n_runs;
      for (int64_t n = 0; n < n_runs; ++n) {
        if (!runs_valid[n]) continue;
        for (int64_t w = 0; w < width; ++w) rows.push_back(runs[n] + w);
      }
      const int64_t keys = static_cast<int64_t>(rows.size());
      float* o = out_ptr + p * group * dim;
      std::fill(o, o + group * dim, 0.0f);
      if (keys == 0) continue;
      const float* qp = q_ptr + p * group * dim;
      // scores [G, keys]: each key row read once for the G query heads that share it
      scores.resize(group * keys);
      const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
      for (int64_t m = 0; m < keys; ++m) {
        if (m + kAhead < keys) prefetch_row(k_ptr + rows[m + kAhead] * dim, row_bytes);
        const float* kr = as_float(k_ptr + rows[m] * dim, dim, k_row);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qp + g * dim;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < dim; ++d) acc += qg[d] * kr[d];
          scores[g * keys + m] = acc * fscale;
        }
      }
      // one softmax per query head over the attended keys
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * keys;
        const float top = *std::max_element(s, s + keys);
        float total = 0.0f;
        for (int64_t m = 0; m < keys; ++m) {
          s[m] = std::exp(s[m] - top);
          total += s[m];
        }
        const float inv = 1.0f / total;
        for (int64_t m = 0; m < keys; ++m) s[m] *= inv;
      }
      // values: each row read once and added to the G outputs with its weights
      for (int64_t m = 0; m < keys; ++m) {
        if (m + kAhead < keys) prefetch_row(v_ptr + rows[m + kAhead] * dim, row_bytes);
        const float* vr = as_float(v_ptr + rows[m] * dim, dim, v_row);
        for (int64_t g = 0; g < group; ++g) {
          const float weight = scores[g * keys + m];
          float* og = o + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) og[d] += weight * vr[d];
        }
      }
    }
  });
}

}  // namespace

// q [B, Hr, Tq, G, D] fp32 contiguous; k, v: the cache's row tables [N, D] (contiguous rows);
// dense_rows [B, Hr, Md] int64, dense_ok [B, 1 or Tq, Md] bool; run_rows [B, Hr, Tq, Nr] int64
// (the first row of each run), run_ok [B, Hr, Tq, Nr] bool. Returns [B, Hr, Tq, G, D] fp32.
torch::Tensor gathered_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                 torch::Tensor dense_rows, torch::Tensor dense_ok,
                                 torch::Tensor run_rows, torch::Tensor run_ok, int64_t width,
                                 double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "gathered_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 5 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "q must be [B, Hr, Tq, G, D] contiguous fp32");
  TORCH_CHECK(k.dim() == 2 && v.dim() == 2 && k.size(1) == q.size(4) && v.size(1) == q.size(4),
              "k and v must be row tables [N, D]");
  TORCH_CHECK(k.stride(0) == q.size(4) && k.stride(1) == 1 && v.stride(0) == q.size(4) &&
                  v.stride(1) == 1 && k.scalar_type() == v.scalar_type(),
              "k and v must be tables of consecutive rows of D elements, of one dtype");
  TORCH_CHECK(dense_rows.is_contiguous() && dense_ok.is_contiguous() && run_rows.is_contiguous() &&
                  run_ok.is_contiguous(),
              "the row indices and their validity must be contiguous");
  TORCH_CHECK(dense_rows.scalar_type() == torch::kInt64 && run_rows.scalar_type() == torch::kInt64 &&
                  dense_ok.scalar_type() == torch::kBool && run_ok.scalar_type() == torch::kBool,
              "rows are int64, validity bool");
  auto out = torch::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "gathered_attention", [&] {
    gathered<scalar_t>(q, k, v, dense_rows, dense_ok, run_rows, run_ok, out, width, scale);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // without the GIL: the serving replica's event loop relays tokens meanwhile
  m.def("gathered_attention", &gathered_attention,
        "gaze decode attention over gathered dense rows and region runs, in place (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
