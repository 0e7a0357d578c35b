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
//
// `decode_step` is a whole decode step of one query per row from its routing scores on: the
// Top-K regions of each row and head (ranked as routing.py's select_regions ranks them), the
// rows they and the dense keys cover, and the same attention, in one call instead of the
// dozen small torch ops per layer that cost more than the attention itself at one row.

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

// The attention of one query row's G heads qp [G, D] over the key rows k + n * k_step and
// the value rows v + n * v_step for every n of `rows` (read in place, in that order): fp32
// scores, one softmax per head, the weighted sum into o [G, D]. Zeros when there is no row.
template <typename scalar_t>
void attend(const float* qp, int64_t group, int64_t dim, const std::vector<int64_t>& rows,
            const scalar_t* k_ptr, int64_t k_step, const scalar_t* v_ptr, int64_t v_step,
            float scale, std::vector<float>& scores, std::vector<float>& k_row,
            std::vector<float>& v_row, float* o) {
  const int64_t keys = static_cast<int64_t>(rows.size());
  std::fill(o, o + group * dim, 0.0f);
  if (keys == 0) return;
  // scores [G, keys]: each key row read once for the G query heads that share it
  scores.resize(group * keys);
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t m = 0; m < keys; ++m) {
    if (m + kAhead < keys) prefetch_row(k_ptr + rows[m + kAhead] * k_step, row_bytes);
    const float* kr = as_float(k_ptr + rows[m] * k_step, dim, k_row);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qp + g * dim;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < dim; ++d) acc += qg[d] * kr[d];
      scores[g * keys + m] = acc * scale;
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
    if (m + kAhead < keys) prefetch_row(v_ptr + rows[m + kAhead] * v_step, row_bytes);
    const float* vr = as_float(v_ptr + rows[m] * v_step, dim, v_row);
    for (int64_t g = 0; g < group; ++g) {
      const float weight = scores[g * keys + m];
      float* og = o + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) og[d] += weight * vr[d];
    }
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
      attend(q_ptr + p * group * dim, group, dim, rows, k_ptr, dim, v_ptr, dim, fscale, scores,
             k_row, v_row, out_ptr + p * group * dim);
    }
  });
}

// ranks region a before region b: the higher score, ties to the lower id (as the stable
// descending sort and the argmax of gazeattn/ops/routing.py's select_regions); NaN first
inline bool ranks_before(const float* s, int64_t a, int64_t b) {
  const bool nan_a = std::isnan(s[a]), nan_b = std::isnan(s[b]);
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && s[a] != s[b]) return s[a] > s[b];
  return a < b;
}

template <typename scalar_t>
void decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
            const torch::Tensor& scores, const torch::Tensor& budget, const torch::Tensor& dense,
            const torch::Tensor& dense_ok, int64_t tail_from, int64_t tail_to,
            const torch::Tensor& starts, int64_t width, const torch::Tensor& sizes,
            const torch::Tensor& context, double scale, torch::Tensor& out, torch::Tensor& ids,
            torch::Tensor& attended) {
  const int64_t batch = q.size(0), hq = q.size(1), dim = q.size(2);
  const int64_t hr = scores.size(1), num_r = scores.size(2), group = hq / hr;
  const int64_t heads_per_kv = hr / k.size(1);
  const int64_t n_dense = dense.size(1), n_runs = starts.size(2), k_max = ids.size(3);
  const float* q_ptr = q.data_ptr<float>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  const float* score_ptr = scores.data_ptr<float>();
  const int64_t* budget_ptr = budget.data_ptr<int64_t>();
  const int64_t* dense_ptr = dense.data_ptr<int64_t>();
  const bool* dense_ok_ptr = dense_ok.data_ptr<bool>();
  const int64_t* starts_ptr = starts.data_ptr<int64_t>();
  const float* size_ptr = sizes.data_ptr<float>();
  const float* context_ptr = context.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  int64_t* ids_ptr = ids.data_ptr<int64_t>();
  float* attended_ptr = attended.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * hr, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows, order(num_r);
    std::vector<float> attn, k_row(dim), v_row(dim);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / hr, kv = (p % hr) / heads_per_kv;
      // the Top-K regions of this row and head, ranked
      const float* s = score_ptr + p * num_r;
      const int64_t kb = std::clamp<int64_t>(budget_ptr[b], 0, std::min(num_r, k_max));
      for (int64_t r = 0; r < num_r; ++r) order[r] = r;
      std::partial_sort(order.begin(), order.begin() + kb, order.end(),
                        [s](int64_t a, int64_t c) { return ranks_before(s, a, c); });
      int64_t* chosen = ids_ptr + p * k_max;
      for (int64_t i = 0; i < k_max; ++i) chosen[i] = i < kb ? order[i] : -1;
      // the key positions it attends: the valid dense keys, the text past the layout, then
      // the runs of the chosen regions in rank order (the torch path's order)
      rows.clear();
      const int64_t* row_dense = dense_ptr + b * n_dense;
      const bool* row_dense_ok = dense_ok_ptr + b * n_dense;
      for (int64_t m = 0; m < n_dense; ++m) {
        if (row_dense_ok[m]) rows.push_back(row_dense[m]);
      }
      for (int64_t t = tail_from; t < tail_to; ++t) rows.push_back(t);
      // the entries it attends: its regions' tokens (in rank order) and the context before it
      float entries = 0.0f;
      for (int64_t i = 0; i < kb; ++i) {
        const int64_t region = order[i];
        entries += size_ptr[b * num_r + region];
        const int64_t* runs = starts_ptr + (b * num_r + region) * n_runs;
        for (int64_t n = 0; n < n_runs; ++n) {
          if (runs[n] < 0) continue;
          for (int64_t w = 0; w < width; ++w) rows.push_back(runs[n] + w);
        }
      }
      attended_ptr[p] = entries + context_ptr[b];
      // the query heads h * G ... h * G + G - 1 of routing head h are consecutive in q
      attend(q_ptr + p * group * dim, group, dim, rows,
             k_ptr + b * k.stride(0) + kv * k.stride(1), k.stride(2),
             v_ptr + b * v.stride(0) + kv * v.stride(1), v.stride(2), fscale, attn, k_row, v_row,
             out_ptr + p * group * dim);
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

// One decode step from the routing scores on: q [B, Hq, D] fp32 contiguous (one query per
// row); k, v [B, Hkv, Tk, D] the cache, read in place through their strides (rows of D
// consecutive elements); scores [B, Hr, R] fp32 (invisible regions -inf), Hr a multiple of
// Hkv dividing Hq (routing head h serves query heads h * Hq / Hr onwards); budget [B] int64
// the regions each row keeps; k_max the widest budget; dense [B, Md] int64 key positions with
// dense_ok [B, Md] bool, then every position in [tail_from, tail_to) (text past the layout);
// starts [B, R, N] int64 the first position of each run of `width` keys a region splits into
// (-1: none); sizes [B, R] fp32 each region's tokens; context [B] fp32 the context tokens
// before the query. Returns out [B, Hq, 1, D] fp32, ids [B, Hr, 1, k_max] int64 (ranked, -1
// padded) and attended [B, Hr, 1] fp32 (the chosen regions' tokens plus the context).
std::vector<torch::Tensor> decode_step(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                       torch::Tensor scores, torch::Tensor budget, int64_t k_max,
                                       torch::Tensor dense, torch::Tensor dense_ok,
                                       int64_t tail_from, int64_t tail_to, torch::Tensor starts,
                                       int64_t width, torch::Tensor sizes,
                                       torch::Tensor context, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "decode_step runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "q must be [B, Hq, D] contiguous fp32");
  const int64_t batch = q.size(0), hq = q.size(1), dim = q.size(2);
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == batch && k.size(3) == dim &&
                  k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == v.scalar_type(),
              "k and v must be [B, Hkv, Tk, D] of one dtype, with rows of D consecutive elements");
  TORCH_CHECK(scores.dim() == 3 && scores.size(0) == batch &&
                  scores.scalar_type() == torch::kFloat32 && scores.is_contiguous(),
              "scores must be [B, Hr, R] contiguous fp32");
  const int64_t hr = scores.size(1), num_r = scores.size(2);
  TORCH_CHECK(hr >= 1 && hq % hr == 0 && hr % k.size(1) == 0,
              "the routing heads must divide the query heads and be a multiple of the KV heads");
  TORCH_CHECK(budget.dim() == 1 && budget.size(0) == batch && budget.scalar_type() == torch::kInt64 &&
                  budget.is_contiguous(),
              "budget must be [B] int64");
  TORCH_CHECK(dense.dim() == 2 && dense.size(0) == batch && dense.scalar_type() == torch::kInt64 &&
                  dense.is_contiguous() && dense_ok.sizes() == dense.sizes() &&
                  dense_ok.scalar_type() == torch::kBool && dense_ok.is_contiguous(),
              "dense must be [B, Md] int64 and dense_ok [B, Md] bool");
  TORCH_CHECK(starts.dim() == 3 && starts.size(0) == batch && starts.size(1) == num_r &&
                  starts.scalar_type() == torch::kInt64 && starts.is_contiguous(),
              "starts must be [B, R, N] int64");
  TORCH_CHECK(sizes.dim() == 2 && sizes.size(0) == batch && sizes.size(1) == num_r &&
                  sizes.scalar_type() == torch::kFloat32 && sizes.is_contiguous(),
              "sizes must be [B, R] fp32");
  TORCH_CHECK(context.dim() == 1 && context.size(0) == batch &&
                  context.scalar_type() == torch::kFloat32 && context.is_contiguous(),
              "context must be [B] fp32");
  TORCH_CHECK(k_max >= 0 && width >= 1 && 0 <= tail_from && tail_from <= tail_to &&
                  tail_to <= k.size(2),
              "bad k_max, width or tail");
  auto out = torch::empty({batch, hq, 1, dim}, q.options());
  auto ids = torch::empty({batch, hr, 1, k_max}, budget.options());
  auto attended = torch::empty({batch, hr, 1}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "decode_step", [&] {
    decode<scalar_t>(q, k, v, scores, budget, dense, dense_ok, tail_from, tail_to, starts, width,
                     sizes, context, scale, out, ids, attended);
  });
  return {out, ids, attended};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // without the GIL: the serving replica's event loop relays tokens meanwhile
  m.def("gathered_attention", &gathered_attention,
        "gaze decode attention over gathered dense rows and region runs, in place (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_step", &decode_step,
        "one gaze decode step from the routing scores: Top-K, then the attention, in place (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
