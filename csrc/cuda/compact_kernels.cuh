// C-style interface to the CUDA kernels of eeruntime._C.
//
// The kernels live in compact_kernels.cu, which includes no torch header so that nvcc can compile
// it on its own (`make check-cuda`). The torch binding (csrc/compact_cuda.cpp) passes raw device
// pointers, byte strides and the stream. Nothing here synchronises with the host, allocates, or
// reads device memory from the host, so every call can be captured in a CUDA graph.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace eeruntime {
namespace cuda {

// One tensor's rows: row r starts at base + r * row_stride bytes and holds row_bytes dense bytes.
struct RowSpan {
  const void* src;
  int64_t src_row_stride;  // bytes; 0 is allowed for a source (a broadcast row)
  void* dst;
  int64_t dst_row_stride;  // bytes
  int64_t row_bytes;
};

// Bytes of scratch that select_flagged needs for num_items flags (CUB's query).
cudaError_t select_flagged_temp_bytes(int num_items, size_t* temp_bytes);

// Stable stream compaction of the row numbers: index_out[j] = the j-th i (ascending) with
// flags[i] != 0, and *count_out = how many there are. Entries of index_out past the count are
// not written. The count stays on the device.
cudaError_t select_flagged(void* temp, size_t temp_bytes, const uint8_t* flags, int num_items,
                           int64_t* index_out, int64_t* count_out, cudaStream_t stream);

// One kernel for compact_into's selection and its first tensor's copy (the binding uses it up to
// kFusedCompactMaxRows rows, csrc/compact_common.h): index_out[:n] = kept row
// numbers (ascending), *count_out = n, and dst row j = src row index_out[j] for j < n. Every block
// counts the mask itself, takes an equal share of the n kept rows (so copy work is balanced
// whatever the mask looks like) and copies them with the widest aligned vector width. No scratch,
// no host sync: graph-capturable. Reads mask[0, num_rows) and the kept source rows only.
cudaError_t fused_compact(const RowSpan& rows, const uint8_t* mask, int num_rows, int64_t* index_out,
                          int64_t* count_out, int sm_count, cudaStream_t stream);

// dst row r = src row index[r] for r < min(*count, n_max). The launch is sized by n_max (the
// capacity) and the kernel reads the count from device memory, so the host never needs it.
cudaError_t gather_rows(const RowSpan& rows, const int64_t* index, const int64_t* count, int64_t n_max,
                        int max_blocks, cudaStream_t stream);

// For every i < n with mask[i] != 0 and 0 <= dst_rows[i] < dst_num_rows:
// dst row dst_rows[i] = src row i. Rows outside [0, dst_num_rows) are skipped (checking them would
// need a host sync; the CPU op raises instead).
cudaError_t scatter_rows(const RowSpan& rows, const uint8_t* mask, const int64_t* dst_rows, int64_t n,
                         int64_t dst_num_rows, int max_blocks, cudaStream_t stream);

}  // namespace cuda
}  // namespace eeruntime
