// Fused CPU kernels for the MoLF routing AdamW step (fp32, contiguous, flat tensors).
//
// The element-wise passes only; what they compute (the score q, the update of the winners' rows) is defined
// in molf_ds/optim/routing.py. Registered as torch ops in the `molf_cpu_adam` namespace (CPU dispatch key),
// one call per param group and step:
//   moments_and_scores_multi: m, v update of every tensor, fused with per-segment sums of the routing
//                             score's channels (double accumulation) into the cells' columns of the table.
//   update_winners_multi:     decoupled weight decay + Adam update inside the winners' segments.
//   moments_scores_speculate_multi / settle_multi: the same in one pass where last step's winners win
//                             again (old values kept in a backup; settle restores or updates the rows
//                             routing disagreed on).
//   adamw_step_multi:         plain fused AdamW.
//   dropout_zero:             zero the elements a (seed, index) hash drops; kept ones unscaled (the
//                             experts' input dropout: no stored mask, backward regenerates it).
//
// Work is split on a fixed grid of kChunk elements, so every partial sum covers the
// same elements in the same order whatever the thread count: results are deterministic.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per work unit (fixed grid)
constexpr int64_t kBlock = 64;                // elements per vectorised block: 4 cache lines
constexpr int64_t kLineFloats = 16;           // floats per 64-byte cache line
constexpr int64_t kAhead = 1024;              // software prefetch distance in elements

// A run of elements inside one grid chunk; seg < 0 marks a gap between segments.
struct Piece {
  int64_t start;
  int64_t len;
  int64_t seg;
};

// Moment coefficients, rounded to float like torch's scalar arguments on fp32 tensors.
struct Moments {
  float w1;         // lerp weight 1 - beta1
  bool small_w1;    // torch's lerp branch: w < 0.5 ? m + w*(g-m) : g - (g-m)*(1-w)
  float beta2;
  float w2;         // 1 - beta2

  Moments(double beta1, double beta2_)
      : w1(static_cast<float>(1.0 - beta1)),
        small_w1(std::abs(1.0 - beta1) < 0.5),
        beta2(static_cast<float>(beta2_)),
        w2(static_cast<float>(1.0 - beta2_)) {}

  inline float m(float g, float m_old) const {
    const float d = g - m_old;
    return small_w1 ? m_old + w1 * d : g - d * (1.0f - w1);
  }
  inline float v(float g, float v_old) const { return v_old * beta2 + w2 * g * g; }
};

// AdamW update coefficients: p = p*decay + step * m / (sqrt(v)/sqrt(bc2) + eps).
// The division by sqrt(bc2) becomes a multiplication (one division per element).
struct Update {
  float decay;
  float step;
  float inv_sqrt_bc2;
  float eps;

  Update(double lr, double wd, double bc1, double bc2, double eps_)
      : decay(static_cast<float>(1.0 - lr * wd)),
        step(static_cast<float>(-lr / bc1)),
        inv_sqrt_bc2(static_cast<float>(1.0 / std::sqrt(bc2))),
        eps(static_cast<float>(eps_)) {}

  inline float p(float p_old, float m, float v) const {
    return p_old * decay + step * (m / (std::sqrt(v) * inv_sqrt_bc2 + eps));
  }
};

// The score types: the codes of molf_ds/scores.py's rows (a score's code is its index there).
constexpr int64_t kEpd = 0, kPfn = 1, kLdw = 2, kScoreTypes = 3;

// The channels a score sums per element (its row's `n_channels` in molf_ds/scores.py).
constexpr int64_t channels_of(int64_t score_type) { return score_type == kLdw ? 3 : 1; }

// The channels q of one element (p: its parameter before the step, read by LDW only): the `channels` of score
// kScore in molf_ds/scores.py.
template <int64_t kScore>
inline void score(float m, float v, float p, float eps_s, float* q) {
  static_assert(kScore >= 0 && kScore < kScoreTypes, "a score type molf_ds/scores.py defines");
  const float denom = std::sqrt(v) + eps_s;
  if constexpr (kScore == kLdw) {  // u = m / (sqrt(v) + eps_s): m*u, u^2, p^2
    const float u = m / denom;
    q[0] = m * u;
    q[1] = u * u;
    q[2] = p * p;
  } else if constexpr (kScore == kPfn) {
    const float r = m / denom;
    q[0] = r * r;
  } else {
    q[0] = m * m / denom;
  }
}

// f(std::integral_constant<int64_t, kScore>) for the score type known at run time (checked at the op's entry).
template <typename F>
inline auto with_score(int64_t score_type, F&& f) {
  switch (score_type) {
    case kPfn:
      return f(std::integral_constant<int64_t, kPfn>{});
    case kLdw:
      return f(std::integral_constant<int64_t, kLdw>{});
    default:
      return f(std::integral_constant<int64_t, kEpd>{});
  }
}

void check_flat(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(t.numel() == ref.numel(), name, " has ", t.numel(), " elements, expected ",
              ref.numel());
}

struct Segments {
  std::vector<int64_t> offsets;
  std::vector<int64_t> lengths;
};

inline int64_t next_grid(int64_t pos) { return (pos / kChunk + 1) * kChunk; }

// Cuts [0, numel) at grid and segment boundaries; gaps are included when with_gaps.
std::vector<Piece> make_pieces(const Segments& s, int64_t numel, bool with_gaps) {
  std::vector<Piece> pieces;
  const size_t nseg = s.offsets.size();
  size_t i = 0;
  int64_t pos = 0;
  while (true) {
    while (i < nseg && s.lengths[i] == 0) ++i;
    if (!with_gaps && i < nseg) pos = std::max(pos, s.offsets[i]);
    if (pos >= numel || (!with_gaps && i == nseg)) break;
    const bool inside = i < nseg && pos >= s.offsets[i];
    const int64_t bound = inside ? s.offsets[i] + s.lengths[i] : (i < nseg ? s.offsets[i] : numel);
    const int64_t end = std::min(bound, next_grid(pos));
    pieces.push_back({pos, end - pos, inside ? static_cast<int64_t>(i) : -1});
    pos = end;
    if (inside && pos == bound) ++i;
  }
  return pieces;
}

// Software prefetch into L2 of each stream, kAhead elements past i. Addresses are
// clamped to the last element (cheaper than a branch, which GCC 12 mis-optimises).
template <typename... T>
inline void prefetch_ahead(int64_t i, int64_t n, const T*... streams) {
  for (int64_t k = i + kAhead; k < i + kAhead + kBlock; k += kLineFloats) {
    const int64_t at = std::min(k, n - 1);
    (__builtin_prefetch(streams + at, 0, 2), ...);
  }
}

// Calls body(i, lane) for every i in [0, n), lane = i % kBlock: vectorised blocks of
// kBlock elements with software prefetch of the streams, then a scalar tail.
// before(i, len) runs ahead of each block or tail of len elements starting at i.
template <typename Before, typename Body, typename... T>
inline void for_each_elem_after(int64_t n, Before before, Body body, const T*... streams) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    prefetch_ahead(i, n, streams...);
    before(i, kBlock);
#pragma omp simd
    for (int64_t lane = 0; lane < kBlock; ++lane) body(i + lane, lane);
  }
  before(i, n - i);
  for (int64_t lane = 0; i + lane < n; ++lane) body(i + lane, lane);
}

template <typename Body, typename... T>
inline void for_each_elem(int64_t n, Body body, const T*... streams) {
  for_each_elem_after(n, [](int64_t, int64_t) {}, body, streams...);
}

// dst[0, len) = src[0, len). Whole 64-byte lines of dst go out as non-temporal stores: the backup is written
// once and read again only when routing disagrees, so it should neither be read for ownership nor stay cached.
inline void copy_streaming(float* __restrict__ dst, const float* __restrict__ src, int64_t len) {
  int64_t k = 0;
#ifdef __AVX512F__
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    for (; k + kLineFloats <= len; k += kLineFloats) _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
  }
#endif
  for (; k < len; ++k) dst[k] = src[k];
}

void update_moments(const float* g, float* m, float* v, int64_t n, Moments c) {
  for_each_elem(
      n,
      [&](int64_t i, int64_t) {
        const float gi = g[i];
        m[i] = c.m(gi, m[i]);
        v[i] = c.v(gi, v[i]);
      },
      g, m, v);
}

// Moments over n elements, and each channel's sum(q) in double into out[channel]. Each lane has its own
// accumulators and the lanes are added in order: the result depends only on the data.
// p: the parameters, read where the score needs them (LDW: before the update).
// kUpdate: also p = the AdamW update `u` (the same as update_params after this pass), old p into backup.
template <int64_t kScore, bool kUpdate = false>
void update_moments_scored(const float* g, float* m, float* v, int64_t n, Moments c, float eps_s, double* out,
                           float* p = nullptr, float* backup = nullptr, Update u = Update(0.0, 0.0, 1.0, 1.0, 0.0)) {
  constexpr int64_t kChannels = channels_of(kScore);
  constexpr bool kReadsP = kUpdate || kScore == kLdw;
  double acc[kChannels][kBlock] = {};
  auto body = [&](int64_t i, int64_t lane) {
    const float gi = g[i];
    const float mi = c.m(gi, m[i]);
    const float vi = c.v(gi, v[i]);
    m[i] = mi;
    v[i] = vi;
    float pi = 0.0f;
    if constexpr (kReadsP) pi = p[i];
    float q[kChannels];
    score<kScore>(mi, vi, pi, eps_s, q);
    for (int64_t ch = 0; ch < kChannels; ++ch) acc[ch][lane] += static_cast<double>(q[ch]);
    if constexpr (kUpdate) p[i] = u.p(pi, mi, vi);
  };
  if constexpr (kUpdate) {
    for_each_elem_after(
        n, [&](int64_t i, int64_t len) { copy_streaming(backup + i, p + i, len); }, body, p, g, m, v);
#ifdef __AVX512F__
    _mm_sfence();  // the streamed backup is complete before anyone reads it
#endif
  } else if constexpr (kReadsP) {
    for_each_elem(n, body, p, g, m, v);
  } else {
    for_each_elem(n, body, g, m, v);
  }
  for (int64_t ch = 0; ch < kChannels; ++ch) {
    double total = 0.0;
    for (double a : acc[ch]) total += a;
    out[ch] = total;
  }
}

void update_params(float* p, const float* m, const float* v, int64_t n, Update u) {
  for_each_elem(n, [&](int64_t i, int64_t) { p[i] = u.p(p[i], m[i], v[i]); }, p, m, v);
}

void adamw_fused(float* p, const float* g, float* m, float* v, int64_t n, Moments c,
                 Update u) {
  for_each_elem(
      n,
      [&](int64_t i, int64_t) {
        const float gi = g[i];
        const float mi = c.m(gi, m[i]);
        const float vi = c.v(gi, v[i]);
        m[i] = mi;
        v[i] = vi;
        p[i] = u.p(p[i], mi, vi);
      },
      p, g, m, v);
}

int threads() { return std::max(1, at::get_num_threads()); }

// ---- multi-tensor entry points: one call per param group and step ------------------------------
//
// The segments of all tensors of a call come as one int64 table [S, 5] of rows
// (tensor, offset, length, cell, kind), sorted by (tensor, offset) and non-overlapping within a
// tensor. Each tensor is cut on the same fixed grid, so every partial sum, and so every result, is the
// same whatever the thread count and however the tensors are grouped into calls.

struct Row {
  int64_t tensor, offset, length, cell, kind;
};

struct MultiPiece {
  int64_t tensor;
  int64_t start;
  int64_t len;
  int64_t row;  // row of the segment, or -1 for a gap
};

void check_list(at::TensorList list, at::TensorList ref, const char* name) {
  TORCH_CHECK(list.size() == ref.size(), name, " has ", list.size(), " tensors, expected ", ref.size());
  for (size_t i = 0; i < list.size(); ++i) check_flat(list[i], ref[i], name);
}

std::vector<Row> read_table(const at::Tensor& table, at::TensorList tensors, int64_t n_cells,
                            int64_t n_kinds) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.size(1) == 5 && table.is_contiguous(),
              "the segment table must be a contiguous int64 CPU tensor [S, 5]");
  const int64_t* t = table.data_ptr<int64_t>();
  std::vector<Row> rows(static_cast<size_t>(table.size(0)));
  int64_t prev_tensor = -1, prev_end = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    Row r{t[5 * i], t[5 * i + 1], t[5 * i + 2], t[5 * i + 3], t[5 * i + 4]};
    TORCH_CHECK(r.tensor >= 0 && r.tensor < static_cast<int64_t>(tensors.size()) && r.tensor >= prev_tensor,
                "segment row ", i, ": tensor ", r.tensor, " is out of range or unsorted");
    if (r.tensor != prev_tensor) prev_end = 0;
    TORCH_CHECK(r.length >= 0 && r.offset >= prev_end && r.offset + r.length <= tensors[r.tensor].numel(),
                "segment row ", i, " (offset ", r.offset, ", length ", r.length,
                ") is unsorted, overlapping or out of bounds");
    TORCH_CHECK(r.cell >= 0 && r.cell < n_cells && r.kind >= 0 && r.kind < n_kinds, "segment row ", i,
                ": cell ", r.cell, " or kind ", r.kind, " out of range");
    prev_tensor = r.tensor;
    prev_end = r.offset + r.length;
    rows[i] = r;
  }
  return rows;
}

// Pieces of every tensor (in tensor order), from the rows `keep` accepts; gaps when with_gaps.
template <typename Keep>
std::vector<MultiPiece> multi_pieces(const std::vector<Row>& rows, at::TensorList tensors,
                                     bool with_gaps, Keep keep) {
  std::vector<MultiPiece> out;
  size_t i = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    Segments segs;
    std::vector<int64_t> ids;
    for (; i < rows.size() && rows[i].tensor == t; ++i) {
      if (!keep(rows[i])) continue;
      segs.offsets.push_back(rows[i].offset);
      segs.lengths.push_back(rows[i].length);
      ids.push_back(static_cast<int64_t>(i));
    }
    if (!with_gaps && segs.offsets.empty()) continue;
    for (const Piece& pc : make_pieces(segs, tensors[t].numel(), with_gaps)) {
      out.push_back({t, pc.start, pc.len, pc.seg < 0 ? -1 : ids[pc.seg]});
    }
  }
  return out;
}

std::vector<Update> kind_updates(const at::Tensor& lrs, const at::Tensor& weight_decays, double bias_correction1,
                                 double bias_correction2, double eps) {
  TORCH_CHECK(lrs.device().is_cpu() && lrs.scalar_type() == at::kDouble && lrs.is_contiguous() &&
                  weight_decays.device().is_cpu() && weight_decays.scalar_type() == at::kDouble &&
                  weight_decays.is_contiguous() && lrs.numel() == weight_decays.numel(),
              "lrs and weight_decays must be contiguous float64 CPU tensors, one value per kind");
  std::vector<Update> updates;
  for (int64_t k = 0; k < lrs.numel(); ++k) {
    updates.emplace_back(lrs.data_ptr<double>()[k], weight_decays.data_ptr<double>()[k], bias_correction1,
                         bias_correction2, eps);
  }
  return updates;
}

const bool* cell_mask(const at::Tensor& mask, int64_t n_cells, const char* name) {
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.dim() == 1 && mask.is_contiguous() &&
                  mask.numel() == n_cells,
              name, " must be a contiguous 1-D bool CPU tensor, one value per cell");
  return mask.data_ptr<bool>();
}

std::vector<float*> data_of(at::TensorList list) {
  std::vector<float*> out(list.size());
  for (size_t t = 0; t < list.size(); ++t) out[t] = list[t].data_ptr<float>();
  return out;
}

// The rows of presumed winners, updated inside the scoring pass (old values into backups).
struct Speculation {
  std::vector<float*> backups;
  const bool* presumed;
  std::vector<Update> updates;  // per kind
};

// Moments of every tensor, and per segment the sum of each of the score's channels times scale[kind], added
// into sums[cell, columns[kind, channel]] (float64) in row order; took_part[cell] is set for every row. `params`
// are read where the score needs them. With `spec`, rows of presumed cells are also updated; returns the number
// of elements updated.
int64_t score_multi(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    const at::Tensor& table, const at::Tensor& scale, const at::Tensor& columns, at::Tensor& sums,
                    at::Tensor& took_part, double beta1, double beta2, int64_t score_type, double eps_s,
                    const Speculation* spec) {
  TORCH_CHECK(score_type >= 0 && score_type < kScoreTypes, "score_type ", score_type,
              " is not a score type this kernel knows (molf_ds/scores.py)");
  for (const auto& g : grads) check_flat(g, g, "grad");
  check_list(params, grads, "param");
  check_list(exp_avgs, grads, "exp_avg");
  check_list(exp_avg_sqs, grads, "exp_avg_sq");
  TORCH_CHECK(sums.device().is_cpu() && sums.scalar_type() == at::kDouble && sums.dim() == 2 &&
                  sums.is_contiguous(),
              "sums must be a contiguous 2-D float64 CPU tensor [cells, columns]");
  const int64_t n_cells = sums.size(0), width = sums.size(1);
  cell_mask(took_part, n_cells, "took_part");
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kDouble && scale.dim() == 1 &&
                  scale.is_contiguous(),
              "scale must be a contiguous 1-D float64 CPU tensor (one value per kind)");
  const int64_t n_channels = channels_of(score_type);
  TORCH_CHECK(columns.device().is_cpu() && columns.scalar_type() == at::kLong && columns.dim() == 2 &&
                  columns.is_contiguous() && columns.size(0) == scale.numel() && columns.size(1) == n_channels,
              "columns must be a contiguous int64 CPU tensor [kinds, ", n_channels, " channels of the score]");
  const int64_t* col = columns.data_ptr<int64_t>();
  for (int64_t i = 0; i < columns.numel(); ++i) {
    TORCH_CHECK(col[i] >= 0 && col[i] < width, "column ", col[i], " is outside the score table's ", width);
  }
  const std::vector<Row> rows = read_table(table, grads, n_cells, scale.numel());
  TORCH_CHECK(!spec || static_cast<int64_t>(spec->updates.size()) == scale.numel(),
              "lrs and weight_decays must hold one value per kind, as scale does");
  const std::vector<MultiPiece> pieces =
      multi_pieces(rows, grads, /*with_gaps=*/true, [](const Row&) { return true; });
  std::vector<double> partial(pieces.size() * n_channels, 0.0);  // [piece, channel]
  std::vector<const float*> g(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) g[t] = grads[t].data_ptr<float>();
  const std::vector<float*> p = data_of(params), m = data_of(exp_avgs), v = data_of(exp_avg_sqs);
  const Moments c(beta1, beta2);
  const float es = static_cast<float>(eps_s);
  const int64_t np = static_cast<int64_t>(pieces.size());
  int64_t updated = 0;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads()) reduction(+ : updated)
  for (int64_t k = 0; k < np; ++k) {
    const MultiPiece& pc = pieces[k];
    const int64_t s = pc.start;
    const size_t t = static_cast<size_t>(pc.tensor);
    double* out = partial.data() + k * n_channels;
    if (pc.row < 0) {
      update_moments(g[t] + s, m[t] + s, v[t] + s, pc.len, c);
    } else if (spec && spec->presumed[rows[pc.row].cell]) {
      float* b = spec->backups[t] + s;
      const Update& u = spec->updates[rows[pc.row].kind];
      with_score(score_type, [&](auto sc) {
        constexpr int64_t kScore = decltype(sc)::value;
        update_moments_scored<kScore, true>(g[t] + s, m[t] + s, v[t] + s, pc.len, c, es, out, p[t] + s, b, u);
      });
      updated += pc.len;
    } else {
      with_score(score_type, [&](auto sc) {
        update_moments_scored<decltype(sc)::value>(g[t] + s, m[t] + s, v[t] + s, pc.len, c, es, out, p[t] + s);
      });
    }
  }
  std::vector<double> seg_sum(rows.size() * n_channels, 0.0);  // [row, channel]
  for (size_t k = 0; k < pieces.size(); ++k) {  // fixed combination order, as moments_and_scores
    if (pieces[k].row < 0) continue;
    for (int64_t ch = 0; ch < n_channels; ++ch) {
      seg_sum[pieces[k].row * n_channels + ch] += partial[k * n_channels + ch];
    }
  }
  double* out = sums.data_ptr<double>();
  bool* took = took_part.data_ptr<bool>();
  const double* sc = scale.data_ptr<double>();
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int64_t ch = 0; ch < n_channels; ++ch) {
      // Rounded product, then the sum (no fused multiply-add): the same two roundings as torch's
      // `sums.index_add_(0, places, seg_sums * scale[kinds])`.
      volatile double scaled = seg_sum[i * n_channels + ch] * sc[rows[i].kind];
      out[rows[i].cell * width + col[rows[i].kind * n_channels + ch]] += scaled;
    }
    took[rows[i].cell] = true;
  }
  return updated;
}

void moments_and_scores_multi(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, const at::Tensor& table, const at::Tensor& scale,
                              const at::Tensor& columns, at::Tensor& sums, at::Tensor& took_part, double beta1,
                              double beta2, int64_t score_type, double eps_s) {
  score_multi(params, grads, exp_avgs, exp_avg_sqs, table, scale, columns, sums, took_part, beta1, beta2, score_type,
              eps_s, nullptr);
}

// moments_and_scores_multi, and inside the rows whose cell is presumed to win, backup = p and the AdamW update
// of p (lr and weight decay of the row's kind): one pass where the two-pass step makes two. Returns the elements
// updated; settle_multi completes the step once the winners are known.
int64_t moments_scores_speculate_multi(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                       at::TensorList exp_avg_sqs, at::TensorList backups, const at::Tensor& table,
                                       const at::Tensor& scale, const at::Tensor& columns, at::Tensor& sums,
                                       at::Tensor& took_part,
                                       const at::Tensor& presumed, const at::Tensor& lrs,
                                       const at::Tensor& weight_decays, double beta1, double beta2,
                                       double bias_correction1, double bias_correction2, double eps, int64_t score_type,
                                       double eps_s) {
  check_list(backups, grads, "backup");
  const Speculation spec{data_of(backups), cell_mask(presumed, took_part.numel(), "presumed"),
                         kind_updates(lrs, weight_decays, bias_correction1, bias_correction2, eps)};
  return score_multi(params, grads, exp_avgs, exp_avg_sqs, table, scale, columns, sums, took_part, beta1, beta2,
                     score_type, eps_s, &spec);
}

// The pass after routing: the AdamW update (lr and weight decay of the row's kind) in the rows whose cell won and
// was not presumed to; a copy back from the backup in the rows presumed to win that lost. `guess` null: nothing
// was presumed (the two-pass step). Returns (elements updated, elements restored).
std::tuple<int64_t, int64_t> after_routing(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                           at::TensorList backups, const at::Tensor& table, const bool* guess,
                                           const at::Tensor& winners, const at::Tensor& lrs,
                                           const at::Tensor& weight_decays, double bias_correction1,
                                           double bias_correction2, double eps) {
  for (const auto& p : params) check_flat(p, p, "param");
  check_list(exp_avgs, params, "exp_avg");
  check_list(exp_avg_sqs, params, "exp_avg_sq");
  if (guess) check_list(backups, params, "backup");
  const std::vector<Update> updates = kind_updates(lrs, weight_decays, bias_correction1, bias_correction2, eps);
  const std::vector<Row> rows = read_table(table, params, winners.numel(), lrs.numel());
  const bool* won = cell_mask(winners, winners.numel(), "winners");
  const std::vector<MultiPiece> pieces = multi_pieces(rows, params, /*with_gaps=*/false, [won, guess](const Row& r) {
    return won[r.cell] != (guess && guess[r.cell]);
  });
  const std::vector<float*> p = data_of(params), m = data_of(exp_avgs), v = data_of(exp_avg_sqs),
                            b = data_of(backups);
  const int64_t np = static_cast<int64_t>(pieces.size());
  int64_t updated = 0, restored = 0;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads()) reduction(+ : updated, restored)
  for (int64_t j = 0; j < np; ++j) {
    const MultiPiece& pc = pieces[j];
    const int64_t s = pc.start;
    const size_t t = static_cast<size_t>(pc.tensor);
    const Row& row = rows[pc.row];
    if (won[row.cell]) {
      update_params(p[t] + s, m[t] + s, v[t] + s, pc.len, updates[row.kind]);
      updated += pc.len;
    } else {
      std::memcpy(p[t] + s, b[t] + s, sizeof(float) * pc.len);
      restored += pc.len;
    }
  }
  return {updated, restored};
}

// After moments_scores_speculate_multi: restore the wrong guesses, update the missed winners.
std::tuple<int64_t, int64_t> settle_multi(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                          at::TensorList backups, const at::Tensor& table, const at::Tensor& presumed,
                                          const at::Tensor& winners, const at::Tensor& lrs,
                                          const at::Tensor& weight_decays, double bias_correction1,
                                          double bias_correction2, double eps) {
  const bool* guess = cell_mask(presumed, winners.numel(), "presumed");
  return after_routing(params, exp_avgs, exp_avg_sqs, backups, table, guess, winners, lrs, weight_decays,
                       bias_correction1, bias_correction2, eps);
}

// The two-pass step's second pass: the AdamW update inside the segments whose cell won; returns the elements updated.
int64_t update_winners_multi(at::TensorList params, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, const at::Tensor& table,
                             const at::Tensor& winners, const at::Tensor& lrs,
                             const at::Tensor& weight_decays, double bias_correction1,
                             double bias_correction2, double eps) {
  return std::get<0>(after_routing(params, exp_avgs, exp_avg_sqs, {}, table, nullptr, winners, lrs, weight_decays,
                                   bias_correction1, bias_correction2, eps));
}

// Plain AdamW over every tensor of the list (the chunks of all tensors in one parallel loop).
void adamw_step_multi(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                      double weight_decay, double bias_correction1, double bias_correction2) {
  for (const auto& p : params) check_flat(p, p, "param");
  check_list(grads, params, "grad");
  check_list(exp_avgs, params, "exp_avg");
  check_list(exp_avg_sqs, params, "exp_avg_sq");
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (tensor, start)
  for (size_t t = 0; t < params.size(); ++t) {
    for (int64_t s = 0; s < params[t].numel(); s += kChunk) chunks.emplace_back(t, s);
  }
  const Moments c(beta1, beta2);
  const Update u(lr, weight_decay, bias_correction1, bias_correction2, eps);
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t k = 0; k < nc; ++k) {
    const size_t t = static_cast<size_t>(chunks[k].first);
    const int64_t s = chunks[k].second;
    adamw_fused(params[t].data_ptr<float>() + s, grads[t].data_ptr<float>() + s,
                exp_avgs[t].data_ptr<float>() + s, exp_avg_sqs[t].data_ptr<float>() + s,
                std::min(kChunk, params[t].numel() - s), c, u);
  }
}

// A well-mixed 32-bit bijection ("lowbias32", Wellons); 32-bit multiplies vectorise.
inline uint32_t mix32(uint32_t z) {
  z ^= z >> 16;
  z *= 0x7feb352dU;
  z ^= z >> 15;
  z *= 0x846ca68bU;
  return z ^ (z >> 16);
}

// Keep element i when a hash of (seed, i) falls below `threshold` (keep_prob * 2^32): a counter-based
// stream, so the mask depends only on (seed, i), never on threads, and backward regenerates it.
template <typename T>
void zero_dropped(const T* __restrict__ src, T* __restrict__ dst, int64_t begin, int64_t end, uint32_t key_lo,
                  uint32_t key_hi, uint32_t threshold) {
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32) ^ key_hi;
    const uint32_t r = mix32(mix32(static_cast<uint32_t>(i) ^ key_lo) + hi);
    dst[i] = r < threshold ? src[i] : T(0);
  }
}

// out = x with the dropped elements zeroed, the kept ones unscaled.
at::Tensor dropout_zero(const at::Tensor& x, int64_t seed, double keep_prob) {
  TORCH_CHECK(x.is_contiguous(), "dropout_zero: x must be contiguous");
  TORCH_CHECK(keep_prob >= 0.0 && keep_prob < 1.0, "dropout_zero: keep_prob must lie in [0, 1)");
  at::Tensor out = at::empty_like(x);
  const auto threshold = static_cast<uint32_t>(std::min(std::llround(keep_prob * 4294967296.0), 4294967295LL));
  const uint32_t key_lo = mix32(static_cast<uint32_t>(seed));
  const uint32_t key_hi = mix32(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32) ^ 0x9e3779b9U);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_zero", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kChunk, [&](int64_t begin, int64_t end) {
      zero_dropped(src, dst, begin, end, key_lo, key_hi, threshold);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(molf_cpu_adam, lib) {
  lib.def(
      "moments_and_scores_multi(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
      "Tensor table, Tensor scale, Tensor columns, Tensor(c!) sums, Tensor(d!) took_part, float beta1, "
      "float beta2, int score_type, float eps_s) -> ()");
  lib.def(
      "update_winners_multi(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor table, "
      "Tensor winners, Tensor lrs, Tensor weight_decays, float bias_correction1, "
      "float bias_correction2, float eps) -> int");
  lib.def(
      "moments_scores_speculate_multi(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] backups, Tensor table, Tensor scale, Tensor columns, "
      "Tensor(e!) sums, Tensor(f!) took_part, Tensor presumed, Tensor lrs, Tensor weight_decays, float beta1, "
      "float beta2, float bias_correction1, float bias_correction2, float eps, int score_type, float eps_s) -> int");
  lib.def(
      "settle_multi(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] backups, Tensor table, "
      "Tensor presumed, Tensor winners, Tensor lrs, Tensor weight_decays, float bias_correction1, "
      "float bias_correction2, float eps) -> (int, int)");
  lib.def(
      "adamw_step_multi(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float bias_correction1, float bias_correction2) -> ()");
  lib.def("dropout_zero(Tensor x, int seed, float keep_prob) -> Tensor");
}

TORCH_LIBRARY_IMPL(molf_cpu_adam, CPU, lib) {
  lib.impl("moments_and_scores_multi", &moments_and_scores_multi);
  lib.impl("update_winners_multi", &update_winners_multi);
  lib.impl("moments_scores_speculate_multi", &moments_scores_speculate_multi);
  lib.impl("settle_multi", &settle_multi);
  lib.impl("adamw_step_multi", &adamw_step_multi);
  lib.impl("dropout_zero", &dropout_zero);
}
