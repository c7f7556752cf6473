// Argument checks and row-layout helpers shared by the CPU and CUDA implementations of the
// eeruntime compaction ops. A "row" is one index of dim 0; the ops copy whole rows as bytes, so
// every dtype works the same way.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace eeruntime {

// Largest batch (mask length) that the CUDA compact_into sends to its fused single-kernel path
// (cuda::fused_compact); larger batches take CUB's select + the row gather. Every block of the
// fused kernel reads the whole mask from L2 (twice; the second pass from L1 and stopping at its
// share), so its redundant mask traffic is about blocks x B bytes: at 1 << 16 rows and ~528 blocks
// (H100/H200, 4 per SM) ~34 MB of L2 reads spread over all SMs, a few microseconds, still cheaper
// than CUB's extra launches and the index round trip through HBM for the copies this path is for;
// past it that traffic grows linearly while CUB's single-pass look-back scan does not.
// bench/test_bench_compact.py times both paths side by side.
constexpr int64_t kFusedCompactMaxRows = int64_t(1) << 16;

// The limit in force: kFusedCompactMaxRows unless overridden. The override exists for tests and
// the benchmark only (eeruntime.ops._ext_backend._compact_into_path), so that both paths can run
// on the same batch; it is process-wide, read on the host at each call (so a captured graph keeps
// the path it was captured with), and is deliberately not an op argument or environment variable:
// the op's schema and behaviour stay the same for every caller. rows < 0 restores the default.
// Returns the previous limit.
int64_t fused_compact_max_rows();
int64_t set_fused_compact_max_rows(int64_t rows);

// True when each row (all dims but 0) is one dense block of memory: rows may then sit at any
// stride in dim 0 (a slice of a larger buffer, a broadcast row) and still be copied with memcpy.
bool rows_are_dense(const at::Tensor& t);

// `t` itself when its rows are dense, else a contiguous copy (the only case that copies inputs).
at::Tensor with_dense_rows(const at::Tensor& t);

// element size * number of elements per row
int64_t row_bytes(const at::Tensor& t);

// byte distance between consecutive rows of a tensor whose rows are dense
int64_t row_stride_bytes(const at::Tensor& t);

// Checks shared by the ops; each raises a c10::Error (ValueError/TypeError in Python) that says
// what was wrong and what is accepted. `B` is the mask length.
int64_t check_mask(const at::Tensor& mask, const char* name);
void check_rows(at::TensorList tensors, int64_t B, const at::Tensor& mask, const char* what);
void check_compact_into(const at::Tensor& keep, at::TensorList tensors, at::TensorList outs,
                        const at::Tensor& index_out, const at::Tensor& count_out);
// Rows written in place must be dense and must not overlap each other.
void check_writable_rows(const at::Tensor& t, const char* what, size_t i);
void check_scatter(const at::Tensor& mask, const at::Tensor& rows, at::TensorList srcs, at::TensorList outs);

}  // namespace eeruntime
