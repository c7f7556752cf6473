// CPU kernel of eeruntime::exit_decision: softmax statistics, confidence score, exit flag and
// (optionally) argmax of every row of a logits batch, reading each row from memory once.
//
// For a row x of C logits (fp32/fp16/bf16/fp64, converted to fp32 first, as the torch reference's
// logits.float(); all math in fp32), with m = max_c x_c:
//
//   S = sum_c e^(x_c - m)               (softmax denominator: p_c = e^(x_c - m) / S)
//   T = sum_c e^(x_c - m) (x_c - m)     (so that sum_c p_c log p_c = T/S - log S)
//   x2 = the second largest logit (m when the maximum is tied; -inf when C = 1), found in pass 2
//        as e^(x2 - m) = the largest e^(x_c - m) with x_c < m, or 1 when m occurs twice
//
//   entropy       H = max(0, log S - T/S)                 exits when H <  threshold
//   max_prob      1 / S                                   exits when score >= threshold
//   margin        p(1) - p(2) = (1 - e^(x2 - m)) / S      exits when score >= threshold
//   norm_entropy  1 - H / log C  (1 when C = 1)           exits when score >= threshold
//
// -inf entries are masked classes: they add 0 to S and T (e^d d -> 0 as d -> -inf). A row holding
// NaN or +inf, or only -inf, scores NaN (torch.softmax is NaN there) and never exits. H >= 0
// exactly (every p log p <= 0), so rounding below 0 is clamped, as in the reference's xlogy sum.
// The argmax is torch.argmax's: the first index of the maximum, or of the first NaN.
//
// Each row is read twice while it sits in cache: pass 1 finds m (and any NaN, and in the narrow
// path the argmax column), pass 2 sums S and T (and e^(x2 - m) for margin). Rows of up to kNarrowC classes go kGroup rows at a time,
// one row per lane; wider rows one at a time with kLanes accumulators along the row. Both shapes
// let the compiler vectorise pass 2 without -ffast-math (which would break the NaN/inf rules
// above); e^d is exp_nonpositive, a branch-free polynomial that vectorises where std::exp is one
// libm call per element. On x86-64 Linux with GCC the row loop is also compiled for AVX2+FMA and
// the CPU picks the clone at load time (pass 2 runs ~2.5x faster). Batches of more than
// kGrainElems logits are split over threads by at::parallel_for; that needs the extension to be
// compiled with OpenMP (-fopenmp), else it runs on the calling thread.
#include "exit_decision_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

// target_clones needs GCC >= 11 (for the x86-64-v3 level) and glibc's ifunc to pick a clone.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__GLIBC__)
#define EERUNTIME_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EERUNTIME_MULTIVERSION
#endif
// The row kernels must be inlined into each clone of decide_rows to be compiled for its ISA.
#if defined(__GNUC__)
#define EERUNTIME_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EERUNTIME_ALWAYS_INLINE inline
#endif

namespace eeruntime {
namespace {

// Accumulators per row in the wide path (vectorised along the row).
constexpr int kLanes = 8;
// Rows of at most kNarrowC classes go kGroup at a time, one row per vector lane.
constexpr int kGroup = 8;
constexpr int64_t kNarrowC = 32;
// Rows per parallel task hold at least this many logits: smaller batches stay on the calling
// thread, where a thread-pool hand-off would cost more than the work (B=256, C=10 takes ~5 us).
constexpr int64_t kGrainElems = int64_t(1) << 15;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

EERUNTIME_ALWAYS_INLINE uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

EERUNTIME_ALWAYS_INLINE float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// v where keep holds, else +0.0f. A bit mask, not `keep ? v : 0`: GCC will not turn a branch
// around floating-point arithmetic into a vector select (the arithmetic might trap), so a
// conditional keeps the whole loop scalar.
EERUNTIME_ALWAYS_INLINE float keep_or_zero(bool keep, float v) {
  return float_of(bits_of(v) & (0u - static_cast<uint32_t>(keep)));
}

// e^d for d <= 0, 0 for d = -inf (and for NaN, which only rows that score NaN anyway produce;
// the clamp also keeps the float-to-int conversion below defined). Cephes-style:
// d = n ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact n ln2), e^r from a degree-6
// polynomial (relative error ~1e-7, like libm's expf), 2^n written into the exponent bits.
// Below -87, e^d < 2^-125 is flushed to 0; against S >= 1 it is far below fp32 resolution.
EERUNTIME_ALWAYS_INLINE float exp_nonpositive(float d) {
  const bool in_range = d > -87.0f;
  // Clamped by bit select as well: with `in_range ? d : -87.0f` GCC specialises the whole
  // polynomial on the constant branch, and that branch then blocks vectorisation.
  const float c = keep_or_zero(in_range, d) + keep_or_zero(!in_range, -87.0f);
  // Round to nearest by the 1.5 * 2^23 shift (SSE2 has no vector round; |c log2 e| < 2^22).
  const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = float_of(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return keep_or_zero(in_range, p * scale);
}

template <typename scalar_t>
EERUNTIME_ALWAYS_INLINE float load(const scalar_t* x, int64_t i) {
  return static_cast<float>(x[i]);
}

// Pass 1: the maximum over the non-NaN values (-inf when there are none) and whether a NaN occurs.
// `v > m ? v : m` skips NaN (the comparison is false), as a vector max instruction does.
template <typename scalar_t>
EERUNTIME_ALWAYS_INLINE float max_skip_nan(const scalar_t* x, int64_t C, bool& has_nan) {
  float m = kNegInf;
  int nan = 0;
  int64_t i = 0;
  if (C >= kLanes) {
    float ml[kLanes];
    int nl[kLanes];
    for (int l = 0; l < kLanes; ++l) ml[l] = kNegInf, nl[l] = 0;
    for (; i + kLanes <= C; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float v = load(x, i + l);
        ml[l] = v > ml[l] ? v : ml[l];
        nl[l] |= v != v;
      }
    for (int l = 0; l < kLanes; ++l) {
      m = ml[l] > m ? ml[l] : m;
      nan |= nl[l];
    }
  }
  for (; i < C; ++i) {
    const float v = load(x, i);
    m = v > m ? v : m;
    nan |= v != v;
  }
  has_nan = nan != 0;
  return m;
}

// Pass 2 accumulators of N rows or lanes: S, T and, for margin (kRunnerUp), e^(x2 - m). That
// comes out of the same sweep: e^d grows with d, so it is the largest e^d over d < 0 (kept as
// bits: for floats >= 0 the integer order of the bits is the numeric order, and an integer max
// vectorises), or 1 when d = 0 more than once (a tied maximum). One array per quantity, so a
// loop over the N entries is plain vector code.
template <int N, bool kRunnerUp>
struct ExpSums {
  float S[N], T[N];
  uint32_t below_bits[N];  // bits of max e^d over d < 0; 0 = +0.0f when there is none
  int32_t at_max[N];       // how many d == 0

  ExpSums() {
    for (int l = 0; l < N; ++l) S[l] = 0.0f, T[l] = 0.0f, below_bits[l] = 0, at_max[l] = 0;
  }
  EERUNTIME_ALWAYS_INLINE void add(int l, float d) {
    const float e = exp_nonpositive(d);
    S[l] += e;
    T[l] += keep_or_zero(e > 0.0f, e * d);  // d = -inf: e = 0 and e * d would be NaN
    if constexpr (kRunnerUp) {
      const uint32_t b = bits_of(keep_or_zero(d < 0.0f, e));
      below_bits[l] = b > below_bits[l] ? b : below_bits[l];
      at_max[l] += d == 0.0f;
    }
  }
  // Entry l of `o` into entry 0 of this.
  EERUNTIME_ALWAYS_INLINE void fold(const ExpSums<kLanes, kRunnerUp>& o, int l) {
    S[0] += o.S[l];
    T[0] += o.T[l];
    below_bits[0] = o.below_bits[l] > below_bits[0] ? o.below_bits[l] : below_bits[0];
    at_max[0] += o.at_max[l];
  }
  // e^(x2 - m) of entry l: 1 for a tied maximum, 0 when every other class is masked (or C = 1).
  EERUNTIME_ALWAYS_INLINE float runner_up(int l) const {
    return at_max[l] > 1 ? 1.0f : float_of(below_bits[l]);
  }
};

// Pass 2 for a row with a finite maximum m and no NaN.
template <bool kRunnerUp, typename scalar_t>
EERUNTIME_ALWAYS_INLINE ExpSums<1, kRunnerUp> sum_exp(const scalar_t* x, int64_t C, float m) {
  ExpSums<1, kRunnerUp> total;
  int64_t i = 0;
  if (C >= kLanes) {
    ExpSums<kLanes, kRunnerUp> lanes;
    for (; i + kLanes <= C; i += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes.add(l, load(x, i + l) - m);
    for (int l = 0; l < kLanes; ++l) total.fold(lanes, l);
  }
  for (; i < C; ++i) total.add(0, load(x, i) - m);
  return total;
}

template <typename scalar_t>
inline int64_t first_index_of(const scalar_t* x, int64_t C, float value) {
  for (int64_t i = 0; i < C; ++i)
    if (load(x, i) == value) return i;
  return 0;  // not reached: value was read from this row
}

// torch.argmax of a row without NaN, whose fp32 maximum is m.
template <typename scalar_t>
inline int64_t first_max(const scalar_t* x, int64_t C, float m) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    // Rounding to fp32 can tie distinct doubles; torch.argmax compares the doubles themselves.
    double best = -std::numeric_limits<double>::infinity();
    int64_t at = 0;
    for (int64_t i = 0; i < C; ++i)
      if (x[i] > best) best = x[i], at = i;  // strict: the first of equal maxima
    return at;
  } else {
    return first_index_of(x, C, m);  // fp16/bf16 -> fp32 is exact: no new ties
  }
}

template <typename scalar_t>
inline int64_t first_nan(const scalar_t* x, int64_t C) {
  for (int64_t i = 0; i < C; ++i) {
    const float v = load(x, i);
    if (v != v) return i;
  }
  return 0;  // not reached: the row holds a NaN
}

struct Params {
  int64_t C, row_stride;
  int64_t criterion;
  float threshold;
  float log_c;  // log C, the norm_entropy scale (unused when C = 1)
  float* conf;
  bool* exits;
  int64_t* argmax;  // nullptr unless return_argmax
};

// The score of DESIGN.md's table from the row's sums (`valid` false: the row scores NaN), and
// its exit flag, both stored for row r. e2 = e^(x2 - m), used by margin only.
inline void finish_row(const Params& p, int64_t r, bool valid, float S, float T, float e2) {
  float score = kNaN;
  if (valid) {
    switch (p.criterion) {
      case kMaxProb:
        score = 1.0f / S;
        break;
      case kMargin:
        score = (1.0f - e2) / S;
        break;
      default: {
        float H = std::log(S) - T / S;
        H = H < 0.0f ? 0.0f : H;
        score = p.criterion == kEntropy ? H : (p.C == 1 ? 1.0f : 1.0f - H / p.log_c);
      }
    }
  }
  p.conf[r] = score;
  // Comparisons with NaN are false: a NaN score never exits.
  p.exits[r] = p.criterion == kEntropy ? score < p.threshold : score >= p.threshold;
}

// Wide rows: one row at a time, each pass vectorised along the row.
template <typename scalar_t>
EERUNTIME_ALWAYS_INLINE void decide_row(const scalar_t* x, const Params& p, int64_t r) {
  const int64_t C = p.C;
  bool has_nan = false;
  const float m = max_skip_nan(x, C, has_nan);
  if (p.argmax != nullptr) p.argmax[r] = has_nan ? first_nan(x, C) : first_max(x, C, m);
  // +inf makes softmax inf/inf = NaN and a row of -inf 0/0: both, like NaN, score NaN.
  if (has_nan || !std::isfinite(m)) {
    finish_row(p, r, false, 0.0f, 0.0f, 0.0f);
  } else if (p.criterion == kMargin) {
    const ExpSums<1, true> e = sum_exp<true>(x, C, m);
    finish_row(p, r, true, e.S[0], e.T[0], e.runner_up(0));
  } else {
    const ExpSums<1, false> e = sum_exp<false>(x, C, m);
    finish_row(p, r, true, e.S[0], e.T[0], 0.0f);
  }
}

// Narrow rows: kGroup rows at a time, one row per vector lane, walked column by column, so short
// rows still fill the vectors (along a row of 10 there would be one vector and a scalar tail).
// Pass 1 also tracks the first column of each row's maximum (the argmax).
template <bool kRunnerUp, typename scalar_t>
EERUNTIME_ALWAYS_INLINE void decide_row_group(const scalar_t* x, const Params& p, int64_t r0) {
  const int64_t C = p.C, rs = p.row_stride;
  float m[kGroup];
  int32_t top[kGroup], nan[kGroup];
  for (int l = 0; l < kGroup; ++l) m[l] = kNegInf, top[l] = 0, nan[l] = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int l = 0; l < kGroup; ++l) {
      const float v = load(x, l * rs + c);
      const bool gt = v > m[l];  // false for NaN; strict, so the first maximum's column stays
      top[l] = gt ? static_cast<int32_t>(c) : top[l];
      m[l] = gt ? v : m[l];
      nan[l] |= v != v;
    }
  // Rows that will score NaN give garbage here, never UB: exp_nonpositive maps NaN to 0.
  ExpSums<kGroup, kRunnerUp> e;
  for (int64_t c = 0; c < C; ++c)
    for (int l = 0; l < kGroup; ++l) e.add(l, load(x, l * rs + c) - m[l]);
  for (int l = 0; l < kGroup; ++l) {
    const scalar_t* row = x + l * rs;
    if (p.argmax != nullptr)
      p.argmax[r0 + l] = nan[l]                               ? first_nan(row, C)
                         : std::is_same_v<scalar_t, double> ? first_max(row, C, m[l])
                                                            : top[l];
    finish_row(p, r0 + l, !nan[l] && std::isfinite(m[l]), e.S[l], e.T[l], e.runner_up(l));
  }
}

// Rows [begin, end). Compiled twice where the compiler can: for AVX2+FMA and for the baseline
// ISA, picked once at load time by the CPU (the vector exp runs about 2.5x faster with AVX2).
template <typename scalar_t>
EERUNTIME_MULTIVERSION void decide_rows(const scalar_t* logits, const Params& p, int64_t begin, int64_t end) {
  int64_t r = begin;
  if (p.C <= kNarrowC) {
    for (; r + kGroup <= end; r += kGroup) {
      if (p.criterion == kMargin)
        decide_row_group<true>(logits + r * p.row_stride, p, r);
      else
        decide_row_group<false>(logits + r * p.row_stride, p, r);
    }
  }
  for (; r < end; ++r) decide_row(logits + r * p.row_stride, p, r);
}

float read_threshold(const std::optional<at::Tensor>& threshold, double threshold_value) {
  if (!threshold.has_value()) return static_cast<float>(threshold_value);
  const at::Tensor& t = *threshold;
  TORCH_CHECK_VALUE(t.numel() == 1, "exit_decision: threshold must be a float or a one-element tensor, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "exit_decision: the CPU kernel reads the threshold on the host; got a ",
                    t.device(), " tensor (pass a CPU tensor or a float)");
  float value = 0.0f;
  // Rounded to fp32, as the reference's threshold.to(torch.float32).
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, t.scalar_type(), "exit_decision_threshold",
                             [&] { value = static_cast<float>(*t.const_data_ptr<scalar_t>()); });
  return value;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_decision_cpu(const at::Tensor& logits,
                                                                 const std::optional<at::Tensor>& threshold,
                                                                 double threshold_value, int64_t criterion,
                                                                 bool return_argmax) {
  check_decision_args(logits, criterion, "exit_decision");
  const float thr = read_threshold(threshold, threshold_value);
  const int64_t B = logits.size(0);
  const auto options = logits.options();
  at::Tensor conf = at::empty({B}, options.dtype(at::kFloat));
  at::Tensor exits = at::empty({B}, options.dtype(at::kBool));
  at::Tensor argmax = at::empty({return_argmax ? B : 0}, options.dtype(at::kLong));
  decide_cpu(logits, thr, criterion, conf.mutable_data_ptr<float>(), exits.mutable_data_ptr<bool>(),
             return_argmax ? argmax.mutable_data_ptr<int64_t>() : nullptr);
  return {conf, exits, argmax};
}

}  // namespace

void check_decision_args(const at::Tensor& logits, int64_t criterion, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D [B, C], got shape ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                       logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kDouble,
                   op, ": logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits must have at least one class (C >= 1)");
  TORCH_CHECK_VALUE(criterion >= kEntropy && criterion <= kNormEntropy, op,
                    ": criterion must be a code 0-3 (entropy, max_prob, margin, norm_entropy), got ", criterion);
}

void decide_cpu(const at::Tensor& logits, float threshold, int64_t criterion, float* conf, bool* exits,
                int64_t* argmax) {
  const int64_t B = logits.size(0), C = logits.size(1);
  if (B == 0) return;
  // Rows may sit at any stride; within a row the kernel needs unit stride.
  const at::Tensor x = (C > 1 && logits.stride(1) != 1) ? logits.contiguous() : logits;
  const float log_c = static_cast<float>(std::log(static_cast<double>(C)));
  const Params params{C, x.stride(0), criterion, threshold, log_c, conf, exits, argmax};
  const int64_t grain = std::max<int64_t>(kGroup, kGrainElems / C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "exit_decision_cpu", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { decide_rows(data, params, begin, end); });
  });
}

TORCH_LIBRARY_IMPL(eeruntime, CPU, m) { m.impl("exit_decision", &exit_decision_cpu); }

}  // namespace eeruntime
