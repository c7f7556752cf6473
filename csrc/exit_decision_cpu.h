// The fused CPU exit-decision kernel (csrc/exit_decision_cpu.cpp), shared by the ops built on it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace eeruntime {

// Criterion codes, shared with eeruntime/criteria.py (CRITERION_CODE) and the Triton kernel.
enum Criterion : int64_t { kEntropy = 0, kMaxProb = 1, kMargin = 2, kNormEntropy = 3 };

// Raises a c10::Error naming `op` unless logits is a 2-D float tensor with C >= 1 and criterion is
// one of the codes above.
void check_decision_args(const at::Tensor& logits, int64_t criterion, const char* op);

// Score and exit flag (and, when argmax is not null, the argmax) of every row of logits [B, C]
// into conf[B], exits[B] and argmax[B], against one threshold; the formulas are at the top of
// exit_decision_cpu.cpp. Rows may sit at any stride. Arguments must have passed
// check_decision_args.
void decide_cpu(const at::Tensor& logits, float threshold, int64_t criterion, float* conf, bool* exits,
                int64_t* argmax);

}  // namespace eeruntime
