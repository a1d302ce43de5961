// Fused CPU kernels for the MoLF routing AdamW step (fp32, contiguous, flat tensors).
//
// Registered as torch ops in the `molf_cpu_adam` namespace (CPU dispatch key):
//   moments_and_scores: m, v update over the whole tensor, fused with per-segment
//                       sums of the routing score q (double accumulation).
//   adamw_update_ranges: decoupled weight decay + Adam update inside segments only.
//   adamw_step:          plain fused AdamW over the whole tensor.
//
// Work is split on a fixed grid of kChunk elements, so every partial sum covers the
// same elements in the same order whatever the thread count: results are deterministic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

template <bool kPfn>
inline float score(float m, float v, float eps_s) {
  const float denom = std::sqrt(v) + eps_s;
  if constexpr (kPfn) {
    const float r = m / denom;
    return r * r;
  } else {
    return m * m / denom;
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

Segments read_segments(const at::Tensor& offsets, const at::Tensor& lengths, int64_t numel) {
  TORCH_CHECK(offsets.device().is_cpu() && lengths.device().is_cpu() &&
                  offsets.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong &&
                  offsets.dim() == 1 && offsets.sizes() == lengths.sizes(),
              "offsets and lengths must be 1-D int64 CPU tensors of equal size");
  const auto off = offsets.contiguous();
  const auto len = lengths.contiguous();
  Segments s{{off.data_ptr<int64_t>(), off.data_ptr<int64_t>() + off.numel()},
             {len.data_ptr<int64_t>(), len.data_ptr<int64_t>() + len.numel()}};
  int64_t prev_end = 0;
  for (size_t i = 0; i < s.offsets.size(); ++i) {
    TORCH_CHECK(s.lengths[i] >= 0 && s.offsets[i] >= prev_end &&
                    s.offsets[i] + s.lengths[i] <= numel,
                "segment ", i, " (offset ", s.offsets[i], ", length ", s.lengths[i],
                ") is unsorted, overlapping or out of bounds (numel ", numel, ")");
    prev_end = s.offsets[i] + s.lengths[i];
  }
  return s;
}

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
template <typename Body, typename... T>
inline void for_each_elem(int64_t n, Body body, const T*... streams) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    prefetch_ahead(i, n, streams...);
#pragma omp simd
    for (int64_t lane = 0; lane < kBlock; ++lane) body(i + lane, lane);
  }
  for (int64_t lane = 0; i + lane < n; ++lane) body(i + lane, lane);
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

// Moments over n elements, returning sum(q) in double. Each lane has its own
// accumulator and the lanes are added in order: the result depends only on the data.
template <bool kPfn>
double update_moments_scored(const float* g, float* m, float* v, int64_t n, Moments c,
                             float eps_s) {
  double acc[kBlock] = {};
  for_each_elem(
      n,
      [&](int64_t i, int64_t lane) {
        const float gi = g[i];
        const float mi = c.m(gi, m[i]);
        const float vi = c.v(gi, v[i]);
        m[i] = mi;
        v[i] = vi;
        acc[lane] += static_cast<double>(score<kPfn>(mi, vi, eps_s));
      },
      g, m, v);
  double total = 0.0;
  for (double a : acc) total += a;
  return total;
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

template <bool kPfn>
void score_pieces(const std::vector<Piece>& pieces, const float* g, float* m, float* v,
                  Moments c, float eps_s, double* partial) {
  const int64_t np = static_cast<int64_t>(pieces.size());
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads())
  for (int64_t k = 0; k < np; ++k) {
    const Piece& pc = pieces[k];
    const int64_t s = pc.start;
    if (pc.seg < 0) {
      update_moments(g + s, m + s, v + s, pc.len, c);
    } else {
      partial[k] = update_moments_scored<kPfn>(g + s, m + s, v + s, pc.len, c, eps_s);
    }
  }
}

at::Tensor moments_and_scores(const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                              double beta1, double beta2, const at::Tensor& offsets,
                              const at::Tensor& lengths, bool pfn, double eps_s) {
  check_flat(grad, grad, "grad");
  check_flat(exp_avg, grad, "exp_avg");
  check_flat(exp_avg_sq, grad, "exp_avg_sq");
  const int64_t numel = grad.numel();
  const Segments segs = read_segments(offsets, lengths, numel);
  const std::vector<Piece> pieces = make_pieces(segs, numel, /*with_gaps=*/true);
  std::vector<double> partial(pieces.size(), 0.0);

  const Moments c(beta1, beta2);
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const float es = static_cast<float>(eps_s);
  if (pfn) {
    score_pieces<true>(pieces, g, m, v, c, es, partial.data());
  } else {
    score_pieces<false>(pieces, g, m, v, c, es, partial.data());
  }

  at::Tensor out = at::zeros({static_cast<int64_t>(segs.offsets.size())}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (size_t k = 0; k < pieces.size(); ++k) {  // fixed combination order
    if (pieces[k].seg >= 0) o[pieces[k].seg] += partial[k];
  }
  return out;
}

void adamw_update_ranges(at::Tensor& param, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const at::Tensor& offsets,
                         const at::Tensor& lengths, double lr, double weight_decay,
                         double bias_correction1, double bias_correction2, double eps) {
  check_flat(param, param, "param");
  check_flat(exp_avg, param, "exp_avg");
  check_flat(exp_avg_sq, param, "exp_avg_sq");
  const int64_t numel = param.numel();
  const std::vector<Piece> pieces =
      make_pieces(read_segments(offsets, lengths, numel), numel, /*with_gaps=*/false);

  const Update u(lr, weight_decay, bias_correction1, bias_correction2, eps);
  float* p = param.data_ptr<float>();
  const float* m = exp_avg.data_ptr<float>();
  const float* v = exp_avg_sq.data_ptr<float>();
  const int64_t np = static_cast<int64_t>(pieces.size());
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads())
  for (int64_t k = 0; k < np; ++k) {
    const int64_t s = pieces[k].start;
    update_params(p + s, m + s, v + s, pieces[k].len, u);
  }
}

void adamw_step(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                double weight_decay, double bias_correction1, double bias_correction2) {
  check_flat(param, param, "param");
  check_flat(grad, param, "grad");
  check_flat(exp_avg, param, "exp_avg");
  check_flat(exp_avg_sq, param, "exp_avg_sq");
  const int64_t numel = param.numel();
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;

  const Moments c(beta1, beta2);
  const Update u(lr, weight_decay, bias_correction1, bias_correction2, eps);
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t k = 0; k < nchunks; ++k) {
    const int64_t s = k * kChunk;
    adamw_fused(p + s, g + s, m + s, v + s, std::min(kChunk, numel - s), c, u);
  }
}

}  // namespace

TORCH_LIBRARY(molf_cpu_adam, lib) {
  lib.def(
      "moments_and_scores(Tensor grad, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, float beta1, "
      "float beta2, Tensor offsets, Tensor lengths, bool pfn, float eps_s) -> Tensor");
  lib.def(
      "adamw_update_ranges(Tensor(a!) param, Tensor exp_avg, Tensor exp_avg_sq, Tensor offsets, "
      "Tensor lengths, float lr, float weight_decay, float bias_correction1, "
      "float bias_correction2, float eps) -> ()");
  lib.def(
      "adamw_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float bias_correction1, float bias_correction2) -> ()");
}

TORCH_LIBRARY_IMPL(molf_cpu_adam, CPU, lib) {
  lib.impl("moments_and_scores", &moments_and_scores);
  lib.impl("adamw_update_ranges", &adamw_update_ranges);
  lib.impl("adamw_step", &adamw_step);
}
