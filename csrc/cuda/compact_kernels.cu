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

// ------------------------------------------------------------------------- fused compact_into
// Fused kernel (see fused_compact in compact_kernels.cuh). Shape of the work:
//   pass 1: every block counts the nonzero flags of the whole mask -> n (block reduce); skipped
//           when the mask is one tile (<= 16384 rows), where pass 2's scan total is n;
//   pass 2: block-wide exclusive scan of the flags, tile by tile, stopping once past its share
//           [lo, hi) = [bx * n / gx, (bx + 1) * n / gx) of the kept rows; it lists the source rows
//           of its share in shared memory and (y-slice 0 only) writes index_out[lo:hi];
//   copy:   the listed rows, columns of slice blockIdx.y, 4 independent loads per thread in flight.
// Shares of kept rows, not of input rows, keep the copy balanced: with contiguous input ranges of
// ~8 rows per block, a random half-kept mask gives some blocks twice the average, and the slowest
// SM sets the time.
constexpr int kFlagWordsPerThread = 4;  // 16-byte mask words per thread per tile
constexpr int64_t kFlagsPerTile = int64_t(kThreads) * kFlagWordsPerThread * 16;  // 16 KB of flags
// Most kept rows one block lists (int32 each in shared memory: 4 KB); the grid is widened so
// that ceil(B / grid.x) never exceeds it.
constexpr int kFusedMaxShare = 1024;
// Blocks per SM of the fused kernel: one wave at 4 x 256 threads (launch bounds cap registers so
// 4 fit), 64 KB of loads in flight per SM (4 x 256 threads x 4 x 16 B), about twice what an
// H100/H200 SM needs to cover DRAM latency at its share of the bandwidth.
constexpr int kFusedBlocksPerSm = 4;
// Copy bytes (upper bound: all rows kept) below which fewer blocks are launched, so a small copy
// does not pay every block's mask reads.
constexpr int64_t kFusedBytesPerBlock = 16 * 1024;

// Number of nonzero bytes of a 32-bit word: the high bit of each byte of
// ((w & 0x7f..) + 0x7f..) | w is set iff that byte is nonzero (no carry crosses bytes).
__device__ __forceinline__ int nonzero_bytes(uint32_t w) {
  return __popc((((w & 0x7F7F7F7Fu) + 0x7F7F7F7Fu) | w) & 0x80808080u);
}

__device__ __forceinline__ int nonzero_bytes(const uint4& w) {
  return nonzero_bytes(w.x) + nonzero_bytes(w.y) + nonzero_bytes(w.z) + nonzero_bytes(w.w);
}

__device__ __forceinline__ uint32_t word_part(const uint4& w, int i) {
  return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
}

// The 16 flags mask[first, first + 16) as one word; flags at or past num_rows read as 0 and are
// never loaded. One 16-byte load when the mask is 16-byte aligned and the word is whole.
__device__ __forceinline__ uint4 load_flags(const uint8_t* __restrict__ mask, int64_t first, int64_t num_rows,
                                            bool aligned) {
  if (first >= num_rows) return make_uint4(0, 0, 0, 0);
  if (aligned && first + 16 <= num_rows) return __ldg(reinterpret_cast<const uint4*>(mask + first));
  uint32_t p[4] = {0, 0, 0, 0};
#pragma unroll
  for (int b = 0; b < 16; ++b)
    if (first + b < num_rows) p[b >> 2] |= uint32_t(mask[first + b] != 0) << (8 * (b & 3));
  return make_uint4(p[0], p[1], p[2], p[3]);
}

// Copies rows kept[0, count) of src to dst rows dst_row0 + j, columns [c0, c_end) of each, in
// vector units V. All threads walk the same (row, column) sequence in lockstep (lanes of a row
// read consecutive units), four items at a time: four loads issued before any store, so even a
// 4 KB row (one unit per thread) keeps four loads in flight per thread. copy_row's unrolling is
// within one row and would leave one load in flight for rows of <= 256 units.
template <typename V>
__device__ __forceinline__ void copy_listed_rows(const char* __restrict__ src, int64_t src_stride,
                                                 char* __restrict__ dst, int64_t dst_stride, int64_t dst_row0,
                                                 const int* kept, int count, int64_t c0, int64_t c_end,
                                                 int log2_tpr) {
  const int lane = threadIdx.x & ((1 << log2_tpr) - 1);
  const int rsub = threadIdx.x >> log2_tpr;
  const int rows_per_pass = kThreads >> log2_tpr;
  const int64_t cols = ((c_end - c0) + (int64_t(1) << log2_tpr) - 1) >> log2_tpr;  // column steps
  const int64_t passes = (count + rows_per_pass - 1) / rows_per_pass;
  const int64_t items = passes * cols;
  int64_t k = 0;  // column step of the next item
  int m = 0;      // row pass of the next item
  for (int64_t i = 0; i < items; i += 4) {
    V v[4];
    V* out[4];
    bool ok[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int j = rsub + m * rows_per_pass;
      const int64_t c = c0 + lane + (k << log2_tpr);
      ok[u] = i + u < items && j < count && c < c_end;
      out[u] = nullptr;
      if (ok[u]) {
        v[u] = reinterpret_cast<const V*>(src + int64_t(kept[j]) * src_stride)[c];
        out[u] = reinterpret_cast<V*>(dst + (dst_row0 + j) * dst_stride) + c;
      }
      if (++k == cols) {
        k = 0;
        ++m;
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (ok[u]) *out[u] = v[u];
  }
}

template <typename V>
__global__ void __launch_bounds__(kThreads, kFusedBlocksPerSm)
fused_compact_kernel(const uint8_t* __restrict__ mask, int num_rows, bool mask_aligned, const char* __restrict__ src,
                     int64_t src_stride, char* __restrict__ dst, int64_t dst_stride, int64_t units,
                     int64_t slice_units, int log2_tpr, int64_t* __restrict__ index_out,
                     int64_t* __restrict__ count_out) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } temp;
  __shared__ int kept[kFusedMaxShare];
  __shared__ int total_kept;

  // Pass 1, for a mask of several tiles only: n, the number of kept rows (every block computes it;
  // the mask sits in L2). A one-tile mask (B <= 16384, one load round) gets n from pass 2's scan.
  int n = -1;
  if (num_rows > kFlagsPerTile) {
    int mine = 0;
    for (int64_t base = 0; base < num_rows; base += kFlagsPerTile) {
#pragma unroll
      for (int w = 0; w < kFlagWordsPerThread; ++w) {
        const int64_t first = base + (int64_t(threadIdx.x) * kFlagWordsPerThread + w) * 16;
        mine += nonzero_bytes(load_flags(mask, first, num_rows, mask_aligned));
      }
    }
    const int block_sum = Reduce(temp.reduce).Sum(mine);
    if (threadIdx.x == 0) total_kept = block_sum;
    __syncthreads();  // also orders the reduce's temp storage before the scan reuses it
    n = total_kept;
    if (int64_t(blockIdx.x) * n / gridDim.x == int64_t(blockIdx.x + 1) * n / gridDim.x) {
      if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) *count_out = n;
      return;  // block-uniform: no share, nothing to list or copy
    }
  }

  // Pass 2: ranks of the kept rows; list those of this block's share [lo, hi). Each thread holds
  // 4 consecutive words (64 consecutive flags) of the tile, so ranks follow the scan of
  // per-thread counts. Every block-level value below (n, lo, hi, carry) is block-uniform.
  int lo = 0, hi = 0;
  int carry = 0;  // kept rows before this tile
  for (int64_t base = 0; base < num_rows; base += kFlagsPerTile) {
    uint4 words[kFlagWordsPerThread];
    int count = 0;
#pragma unroll
    for (int w = 0; w < kFlagWordsPerThread; ++w) {
      words[w] = load_flags(mask, base + (int64_t(threadIdx.x) * kFlagWordsPerThread + w) * 16, num_rows,
                            mask_aligned);
      count += nonzero_bytes(words[w]);
    }
    int before = 0, tile_total = 0;
    Scan(temp.scan).ExclusiveSum(count, before, tile_total);
    if (n < 0) n = tile_total;  // one tile: the scan's total is the count
    lo = int(int64_t(blockIdx.x) * n / gridDim.x);
    hi = int(int64_t(blockIdx.x + 1) * n / gridDim.x);
    int r = carry + before;
    if (count > 0 && r < hi && r + count > lo) {
#pragma unroll
      for (int w = 0; w < kFlagWordsPerThread; ++w) {
#pragma unroll
        for (int b = 0; b < 16; ++b) {
          if ((word_part(words[w], b >> 2) >> (8 * (b & 3))) & 0xFFu) {
            if (r >= lo && r < hi) {
              const int row = int(base + (int64_t(threadIdx.x) * kFlagWordsPerThread + w) * 16 + b);
              kept[r - lo] = row;
              if (blockIdx.y == 0) index_out[r] = row;
            }
            ++r;
          }
        }
      }
    }
    carry += tile_total;
    __syncthreads();  // temp.scan is reused by the next tile; kept[] is read after the loop
    if (carry >= hi) break;
  }
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) *count_out = n;
  if (lo == hi) return;

  const int64_t c0 = int64_t(blockIdx.y) * slice_units;
  const int64_t c_end = c0 + slice_units < units ? c0 + slice_units : units;
  if (c0 < c_end)
    copy_listed_rows<V>(src, src_stride, dst, dst_stride, lo, kept, hi - lo, c0, c_end, log2_tpr);
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

// Threads per row: the next power of two >= the row's units, at most a whole block.
Tiling tiling_for(int64_t units) {
  const int log2_tpr = ceil_log2(units) < kLog2Threads ? ceil_log2(units) : kLog2Threads;
  return Tiling{log2_tpr, kThreads >> log2_tpr};
}

// Grid for `num_rows` rows of `units` vector units: x walks rows, y splits long rows, both
// grid-stride, at most max_blocks blocks in all.
dim3 grid_for(int64_t num_rows, int64_t units, int max_blocks, Tiling* tiling) {
  *tiling = tiling_for(units);
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
cudaError_t launch_fused(const RowSpan& s, int width, const uint8_t* mask, int num_rows, int64_t* index_out,
                         int64_t* count_out, int sm_count, cudaStream_t stream) {
  const int64_t units = s.row_bytes / width;
  const Tiling t = tiling_for(units);
  const int64_t tpr = int64_t(1) << t.log2_tpr;
  // Blocks: one wave (kFusedBlocksPerSm per SM), fewer for a small copy, and never so few that a
  // share could overflow the shared list.
  const double copy_bytes = double(num_rows) * double(s.row_bytes);
  int64_t blocks = int64_t(copy_bytes / kFusedBytesPerBlock) + 1;
  const int64_t budget = int64_t(sm_count > 0 ? sm_count : 1) * kFusedBlocksPerSm;
  if (blocks > budget) blocks = budget;
  // Column slices (grid y) for long rows: each slice at least tpr * kUnitsPerThread units.
  int64_t gy = (units + tpr * kUnitsPerThread - 1) / (tpr * kUnitsPerThread);
  if (gy < 1) gy = 1;
  if (gy > blocks) gy = blocks;
  if (gy > kMaxGridY) gy = kMaxGridY;
  int64_t gx = blocks / gy;
  const int64_t min_gx = (int64_t(num_rows) + kFusedMaxShare - 1) / kFusedMaxShare;
  if (gx < min_gx) gx = min_gx;
  // Slice width: a whole number of tpr-wide column steps.
  const int64_t steps = (units + tpr - 1) / tpr;
  const int64_t slice_units = ((steps + gy - 1) / gy) * tpr;
  const bool aligned = reinterpret_cast<uintptr_t>(mask) % 16 == 0;
  fused_compact_kernel<V><<<dim3(unsigned(gx), unsigned(gy), 1), kThreads, 0, stream>>>(
      mask, num_rows, aligned, static_cast<const char*>(s.src), s.src_row_stride, static_cast<char*>(s.dst),
      s.dst_row_stride, units, slice_units, t.log2_tpr, index_out, count_out);
  return cudaGetLastError();
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

cudaError_t fused_compact(const RowSpan& s, const uint8_t* mask, int num_rows, int64_t* index_out,
                          int64_t* count_out, int sm_count, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  // A zero-byte row copies nothing; the kernel still writes index_out and the count.
  switch (const int w = s.row_bytes > 0 ? vector_width(s) : 16) {
    case 16: return launch_fused<uint4>(s, w, mask, num_rows, index_out, count_out, sm_count, stream);
    case 8: return launch_fused<uint2>(s, w, mask, num_rows, index_out, count_out, sm_count, stream);
    case 4: return launch_fused<uint32_t>(s, w, mask, num_rows, index_out, count_out, sm_count, stream);
    case 2: return launch_fused<uint16_t>(s, w, mask, num_rows, index_out, count_out, sm_count, stream);
    default: return launch_fused<uint8_t>(s, w, mask, num_rows, index_out, count_out, sm_count, stream);
  }
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
