// CPU kernel of eeruntime::exit_scatter: one exit of the runtime's eager loop in one call.
//
// For the n rows that reached exit `exit` (logits [n, C], their original batch rows `rows` [n]):
// score every row (the fused kernel of exit_decision_cpu.cpp), decide against thresholds[exit]
// (or, at the final exit, let every row leave, NaN scores included), write each leaving row's
// logits, score and exit number at its original row of out / confidence / exit_index, and return
// keep = the rows that go on, with the number that left. Eager PyTorch needs six calls for this
// (softmax statistics, compare, count, three scatters) and a threshold view; each call costs more
// than the work at serving batch sizes on a CPU.
#include "compact_common.h"
#include "exit_decision_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

namespace eeruntime {
namespace {

// Rows per parallel task of the scatter hold at least this many bytes of logits.
constexpr int64_t kScatterGrainBytes = int64_t(1) << 16;

float threshold_at(const at::Tensor& thresholds, int64_t exit) {
  TORCH_CHECK_VALUE(thresholds.dim() == 1 && exit >= 0 && exit < thresholds.size(0),
                    "exit_scatter: exit ", exit, " has no threshold in thresholds of shape ", thresholds.sizes(),
                    " (one per early exit)");
  TORCH_CHECK_VALUE(thresholds.device().is_cpu(), "exit_scatter: thresholds must be a CPU tensor, got one on ",
                    thresholds.device());
  float value = 0.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, thresholds.scalar_type(), "exit_scatter_threshold", [&] {
    value = static_cast<float>(thresholds.const_data_ptr<scalar_t>()[exit * thresholds.stride(0)]);
  });
  return value;
}

void check_destination(const at::Tensor& t, int64_t n_out, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n_out && t.scalar_type() == dtype && t.device().is_cpu(), "exit_scatter: ",
                    name, " must be ", dtype, " [", n_out, "] on the CPU (one entry per row of out), got ",
                    t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

std::tuple<at::Tensor, at::Tensor> exit_scatter_cpu(const at::Tensor& logits, const at::Tensor& thresholds,
                                                 int64_t criterion, int64_t exit, bool final, const at::Tensor& rows,
                                                 const at::Tensor& out, const at::Tensor& confidence,
                                                 const at::Tensor& exit_index) {
  check_decision_args(logits, criterion, "exit_scatter");
  const int64_t n = logits.size(0), C = logits.size(1);
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.size(0) == n && rows.device().is_cpu(),
                    "exit_scatter: rows must be int64 [", n, "] on the CPU (one per row of logits), got ",
                    rows.scalar_type(), " ", rows.sizes(), " on ", rows.device());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(1) == C && out.device().is_cpu() && out.is_floating_point(),
                    "exit_scatter: out must be a floating [B, ", C, "] CPU tensor (the logits' classes), got ",
                    out.scalar_type(), " ", out.sizes(), " on ", out.device());
  TORCH_CHECK_VALUE(rows_are_dense(out) && (out.size(0) <= 1 || out.stride(0) >= C),
                    "exit_scatter: out must have distinct rows with unit stride along a row, got strides ",
                    out.strides());
  check_destination(confidence, out.size(0), at::kFloat, "confidence");
  check_destination(exit_index, out.size(0), at::kLong, "exit_index");
  const float thr = final ? 0.0f : threshold_at(thresholds, exit);

  at::Tensor keep = at::empty({n}, logits.options().dtype(at::kBool));
  // A 0-d int64 tensor, not an int: torch's functionalization (torch.compile) cannot yet take a
  // custom op that both mutates inputs and returns a SymInt.
  at::Tensor count = at::zeros({}, logits.options().dtype(at::kLong));
  if (n == 0) return {keep, count};
  at::Tensor conf = at::empty({n}, logits.options().dtype(at::kFloat));
  float* cp = conf.mutable_data_ptr<float>();
  bool* kp = keep.mutable_data_ptr<bool>();
  decide_cpu(logits, thr, criterion, cp, kp, nullptr);  // kp holds "exits" until flipped below

  const at::Tensor rw = rows.contiguous();
  const int64_t* rp = rw.const_data_ptr<int64_t>();
  const int64_t B = out.size(0);
  int64_t n_exit = 0;
  int64_t bad = -1;
  for (int64_t i = 0; i < n; ++i) {
    const bool leaves = final || kp[i];
    kp[i] = !leaves;
    n_exit += leaves;
    if (leaves && (rp[i] < 0 || rp[i] >= B)) bad = rp[i];
  }
  // Checked before any write, so a bad row leaves every output untouched.
  TORCH_CHECK_INDEX(bad == -1, "exit_scatter: rows holds ", bad, " for a leaving row but out has ", B, " rows");
  *count.mutable_data_ptr<int64_t>() = n_exit;
  if (n_exit == 0) return {keep, count};

  // A dtype change goes through one conversion, as the reference's .to(out.dtype).
  const at::Tensor src = logits.scalar_type() == out.scalar_type() ? with_dense_rows(logits)
                                                                   : logits.to(out.scalar_type()).contiguous();
  const int64_t rb = row_bytes(out);
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
  const int64_t ss = row_stride_bytes(src), os = row_stride_bytes(out);
  float* conf_out = confidence.mutable_data_ptr<float>();
  int64_t* exit_out = exit_index.mutable_data_ptr<int64_t>();
  const int64_t cs = confidence.stride(0), es = exit_index.stride(0);
  at::parallel_for(0, n, std::max<int64_t>(1, kScatterGrainBytes / std::max<int64_t>(rb, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (kp[i]) continue;
      const int64_t r = rp[i];
      std::memcpy(op + r * os, sp + i * ss, static_cast<size_t>(rb));
      conf_out[r * cs] = cp[i];
      exit_out[r * es] = exit;
    }
  });
  return {keep, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(eeruntime, CPU, m) { m.impl("exit_scatter", &exit_scatter_cpu); }

}  // namespace eeruntime
