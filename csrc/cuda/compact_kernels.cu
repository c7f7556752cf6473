// CUDA kernels of eeruntime._C: stable selection of kept row numbers (CUB) and row gather /
// scatter with the widest aligned vector copies. No torch header: `nvcc -c` compiles this alone.
//
// Formulas (see compact_kernels.cuh):
//   select:  index[j] = j-th i with flags[i] != 0 (ascending), count = sum_i [flags[i] != 0]
//   gather:  dst[r, :] = src[index[r], :]            for r < min(count, n_max)
//   scatter: dst[dst_rows[i], :] = src[i, :]         for i < n with mask[i] != 0
#include "compact_kernels.cuh"

#include <cub/cub.cuh>
#include <thrust/iterator/counting_iterator.h>

namespace eeruntime {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLog2Threads = 8;
// Vector units each thread copies per row chunk: enough loads in flight per thread to cover
// memory latency, few enough that short rows still spread over many blocks.
constexpr int64_t kUnitsPerThread = 4;
constexpr int64_t kMaxGridY = 65535;

// How a block's 256 threads cover rows: `tpr` threads per row (a power of two, at most 256) and
// 256 / tpr rows side by side, so 64-byte rows do not leave most threads idle.
struct Tiling {
  int log2_tpr;
  int rows_per_block;
};

// Copies units [start, units) of one row with stride `step`, four independent loads in flight.
template <typename V>
__device__ __forceinline__ void copy_row(const V* __restrict__ in, V* __restrict__ out, int64_t units,
                                         int64_t start, int64_t step) {
  int64_t c = start;
  for (; c + 3 * step < units; c += 4 * step) {
    const V a = in[c];
    const V b = in[c + step];
    const V d = in[c + 2 * step];
    const V e = in[c + 3 * step];
    out[c] = a;
    out[c + step] = b;
    out[c + 2 * step] = d;
    out[c + 3 * step] = e;
  }
  for (; c < units; c += step) out[c] = in[c];
}

template <typename V>
__global__ void __launch_bounds__(kThreads)
gather_rows_kernel(const char* __restrict__ src, int64_t src_stride, char* __restrict__ dst, int64_t dst_stride,
                   int64_t units, const int64_t* __restrict__ index, const int64_t* __restrict__ count,
                   int64_t n_max, int log2_tpr) {
  const int64_t c = *count;
  const int64_t n = c < n_max ? c : n_max;
  const int lane = threadIdx.x & ((1 << log2_tpr) - 1);
  const int64_t rows_per_block = kThreads >> log2_tpr;
  const int64_t tpr = int64_t(1) << log2_tpr;
  const int64_t col_start = int64_t(blockIdx.y) * tpr + lane;
  const int64_t col_step = tpr * gridDim.y;
  for (int64_t r = int64_t(blockIdx.x) * rows_per_block + (threadIdx.x >> log2_tpr); r < n;
       r += int64_t(gridDim.x) * rows_per_block) {
    const V* in = reinterpret_cast<const V*>(src + index[r] * src_stride);
    V* out = reinterpret_cast<V*>(dst + r * dst_stride);
    copy_row(in, out, units, col_start, col_step);
  }
}

template <typename V>
__global__ void __launch_bounds__(kThreads)
scatter_rows_kernel(const char* __restrict__ src, int64_t src_stride, char* __restrict__ dst, int64_t dst_stride,
                    int64_t units, const uint8_t* __restrict__ mask, const int64_t* __restrict__ dst_rows,
                    int64_t n, int64_t dst_num_rows, int log2_tpr) {
  const int lane = threadIdx.x & ((1 << log2_tpr) - 1);
  const int64_t rows_per_block = kThreads >> log2_tpr;
  const int64_t tpr = int64_t(1) << log2_tpr;
  const int64_t col_start = int64_t(blockIdx.y) * tpr + lane;
  const int64_t col_step = tpr * gridDim.y;
  for (int64_t i = int64_t(blockIdx.x) * rows_per_block + (threadIdx.x >> log2_tpr); i < n;
       i += int64_t(gridDim.x) * rows_per_block) {
    if (!mask[i]) continue;
    const int64_t r = dst_rows[i];
    if (r < 0 || r >= dst_num_rows) continue;
    const V* in = reinterpret_cast<const V*>(src + i * src_stride);
    V* out = reinterpret_cast<V*>(dst + r * dst_stride);
    copy_row(in, out, units, col_start, col_step);
  }
}

// The widest of 16/8/4/2/1 bytes that divides both base addresses, both row strides and the row
// size, so every vector access is aligned.
int vector_width(const RowSpan& s) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(s.src) | reinterpret_cast<uintptr_t>(s.dst) |
                        uint64_t(s.src_row_stride) | uint64_t(s.dst_row_stride) | uint64_t(s.row_bytes);
  for (int w = 16; w > 1; w /= 2)
    if (bits % w == 0) return w;
  return 1;
}

int ceil_log2(int64_t x) {
  int k = 0;
  while ((int64_t(1) << k) < x) ++k;
  return k;
}

// Grid for `num_rows` rows of `units` vector units: x walks rows, y splits long rows, both
// grid-stride, at most max_blocks blocks in all.
dim3 grid_for(int64_t num_rows, int64_t units, int max_blocks, Tiling* tiling) {
  tiling->log2_tpr = ceil_log2(units) < kLog2Threads ? ceil_log2(units) : kLog2Threads;
  tiling->rows_per_block = kThreads >> tiling->log2_tpr;
  const int64_t tpr = int64_t(1) << tiling->log2_tpr;
  int64_t gy = (units + tpr * kUnitsPerThread - 1) / (tpr * kUnitsPerThread);
  const int64_t budget = max_blocks > 0 ? max_blocks : 1;
  if (gy > budget) gy = budget;
  if (gy > kMaxGridY) gy = kMaxGridY;
  int64_t gx = (num_rows + tiling->rows_per_block - 1) / tiling->rows_per_block;
  if (gx * gy > budget) gx = budget / gy > 0 ? budget / gy : 1;
  return dim3(unsigned(gx), unsigned(gy), 1);
}

template <typename V>
cudaError_t launch_gather(const RowSpan& s, int width, const int64_t* index, const int64_t* count, int64_t n_max,
                          int max_blocks, cudaStream_t stream) {
  const int64_t units = s.row_bytes / width;
  Tiling t;
  const dim3 grid = grid_for(n_max, units, max_blocks, &t);
  gather_rows_kernel<V><<<grid, kThreads, 0, stream>>>(
      static_cast<const char*>(s.src), s.src_row_stride, static_cast<char*>(s.dst), s.dst_row_stride, units, index,
      count, n_max, t.log2_tpr);
  return cudaGetLastError();
}

template <typename V>
cudaError_t launch_scatter(const RowSpan& s, int width, const uint8_t* mask, const int64_t* dst_rows, int64_t n,
                           int64_t dst_num_rows, int max_blocks, cudaStream_t stream) {
  const int64_t units = s.row_bytes / width;
  Tiling t;
  const dim3 grid = grid_for(n, units, max_blocks, &t);
  scatter_rows_kernel<V><<<grid, kThreads, 0, stream>>>(
      static_cast<const char*>(s.src), s.src_row_stride, static_cast<char*>(s.dst), s.dst_row_stride, units, mask,
      dst_rows, n, dst_num_rows, t.log2_tpr);
  return cudaGetLastError();
}

}  // namespace

cudaError_t select_flagged_temp_bytes(int num_items, size_t* temp_bytes) {
  *temp_bytes = 0;
  return cub::DeviceSelect::Flagged(nullptr, *temp_bytes, thrust::counting_iterator<int64_t>(0),
                                    static_cast<const uint8_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                    static_cast<int64_t*>(nullptr), num_items);
}

cudaError_t select_flagged(void* temp, size_t temp_bytes, const uint8_t* flags, int num_items, int64_t* index_out,
                           int64_t* count_out, cudaStream_t stream) {
  return cub::DeviceSelect::Flagged(temp, temp_bytes, thrust::counting_iterator<int64_t>(0), flags, index_out,
                                    count_out, num_items, stream);
}

cudaError_t gather_rows(const RowSpan& s, const int64_t* index, const int64_t* count, int64_t n_max, int max_blocks,
                        cudaStream_t stream) {
  if (n_max <= 0 || s.row_bytes <= 0) return cudaSuccess;
  switch (const int w = vector_width(s)) {
    case 16: return launch_gather<uint4>(s, w, index, count, n_max, max_blocks, stream);
    case 8: return launch_gather<uint2>(s, w, index, count, n_max, max_blocks, stream);
    case 4: return launch_gather<uint32_t>(s, w, index, count, n_max, max_blocks, stream);
    case 2: return launch_gather<uint16_t>(s, w, index, count, n_max, max_blocks, stream);
    default: return launch_gather<uint8_t>(s, w, index, count, n_max, max_blocks, stream);
  }
}

cudaError_t scatter_rows(const RowSpan& s, const uint8_t* mask, const int64_t* dst_rows, int64_t n,
                         int64_t dst_num_rows, int max_blocks, cudaStream_t stream) {
  if (n <= 0 || s.row_bytes <= 0) return cudaSuccess;
  switch (const int w = vector_width(s)) {
    case 16: return launch_scatter<uint4>(s, w, mask, dst_rows, n, dst_num_rows, max_blocks, stream);
    case 8: return launch_scatter<uint2>(s, w, mask, dst_rows, n, dst_num_rows, max_blocks, stream);
    case 4: return launch_scatter<uint32_t>(s, w, mask, dst_rows, n, dst_num_rows, max_blocks, stream);
    case 2: return launch_scatter<uint16_t>(s, w, mask, dst_rows, n, dst_num_rows, max_blocks, stream);
    default: return launch_scatter<uint8_t>(s, w, mask, dst_rows, n, dst_num_rows, max_blocks, stream);
  }
}

}  // namespace cuda
}  // namespace eeruntime
