// CPU kernels of the eeruntime compaction ops: one pass over the mask for the kept row numbers,
// then whole-row memcpy (runs of consecutive kept rows in one call), parallel for large copies.
#include "compact_common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

namespace eeruntime {
namespace {

// Below this many bytes per task a copy stays on one thread: spawning costs more than it saves.
constexpr int64_t kCopyGrainBytes = int64_t(1) << 16;
// Mask entries per selection chunk; a mask of one chunk is scanned inline.
constexpr int64_t kSelectChunk = int64_t(1) << 15;

const uint8_t* mask_bytes(const at::Tensor& mask) {
  // bool is stored as one byte; reading bytes treats any non-zero byte as true.
  return static_cast<const uint8_t*>(mask.const_data_ptr());
}

// Stable selection in two passes: offsets[c] = kept rows before chunk c, then each chunk writes
// its kept row numbers at its offset. Returns n = offsets.back().
int64_t count_kept(const uint8_t* keep, int64_t B, std::vector<int64_t>& offsets) {
  const int64_t chunks = (B + kSelectChunk - 1) / kSelectChunk;
  offsets.assign(static_cast<size_t>(chunks) + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * kSelectChunk, hi = std::min(B, lo + kSelectChunk);
      int64_t count = 0;
      for (int64_t i = lo; i < hi; ++i) count += keep[i] != 0;
      offsets[c + 1] = count;
    }
  });
  std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
  return offsets.back();
}

void fill_index(const uint8_t* keep, int64_t B, const std::vector<int64_t>& offsets, int64_t* index) {
  const int64_t chunks = static_cast<int64_t>(offsets.size()) - 1;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // Branch-free selection (a random mask mispredicts half its branches): every row number is
    // written and the cursor advances only for kept rows. The stray write past the last kept row
    // must not land in the caller's buffer, so it goes to a scratch list copied out afterwards.
    std::vector<int64_t> scratch(static_cast<size_t>(std::min(B, kSelectChunk)) + 1);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * kSelectChunk, hi = std::min(B, lo + kSelectChunk);
      int64_t j = 0;
      for (int64_t i = lo; i < hi; ++i) {
        scratch[j] = i;
        j += keep[i] != 0;
      }
      std::memcpy(index + offsets[c], scratch.data(), static_cast<size_t>(j) * sizeof(int64_t));
    }
  });
}

int64_t rows_per_task(int64_t row_bytes) { return std::max<int64_t>(1, kCopyGrainBytes / row_bytes); }

// dst row r = src row index[r], r < n. RowBytes > 0 is a compile-time row size (one load and
// store per row); 0 means row_bytes at run time, copied by memcpy in runs of consecutive rows.
template <int64_t RowBytes>
void gather(const char* src, int64_t src_stride, char* dst, int64_t dst_stride, int64_t row_bytes,
            const int64_t* index, int64_t n) {
  const bool runs = src_stride == row_bytes && dst_stride == row_bytes;
  at::parallel_for(0, n, rows_per_task(row_bytes), [&](int64_t begin, int64_t end) {
    if constexpr (RowBytes > 0) {
      for (int64_t r = begin; r < end; ++r) std::memcpy(dst + r * dst_stride, src + index[r] * src_stride, RowBytes);
      return;
    }
    for (int64_t r = begin; r < end;) {
      int64_t len = 1;
      if (runs)
        while (r + len < end && index[r + len] == index[r] + len) ++len;
      std::memcpy(dst + r * dst_stride, src + index[r] * src_stride, static_cast<size_t>(len * row_bytes));
      r += len;
    }
  });
}

void gather_rows(const at::Tensor& src, const at::Tensor& dst, const int64_t* index, int64_t n) {
  const int64_t rb = row_bytes(src);
  if (n == 0 || rb == 0) return;
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.mutable_data_ptr());
  const int64_t ss = row_stride_bytes(src), ds = row_stride_bytes(dst);
  switch (rb) {
    case 1: return gather<1>(s, ss, d, ds, rb, index, n);
    case 2: return gather<2>(s, ss, d, ds, rb, index, n);
    case 4: return gather<4>(s, ss, d, ds, rb, index, n);
    case 8: return gather<8>(s, ss, d, ds, rb, index, n);
    case 16: return gather<16>(s, ss, d, ds, rb, index, n);
    case 32: return gather<32>(s, ss, d, ds, rb, index, n);
    case 64: return gather<64>(s, ss, d, ds, rb, index, n);
    default: return gather<0>(s, ss, d, ds, rb, index, n);
  }
}

at::Tensor empty_rows_like(const at::Tensor& t, int64_t n) {
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[0] = n;
  return at::empty(sizes, t.options());
}

std::tuple<at::Tensor, std::vector<at::Tensor>> compact_cpu(const at::Tensor& keep, at::TensorList tensors) {
  const int64_t B = check_mask(keep, "keep");
  check_rows(tensors, B, keep, "tensors");
  const at::Tensor k = keep.contiguous();
  std::vector<int64_t> offsets;
  const int64_t n = count_kept(mask_bytes(k), B, offsets);
  at::Tensor index = at::empty({n}, keep.options().dtype(at::kLong));
  int64_t* idx = index.mutable_data_ptr<int64_t>();
  fill_index(mask_bytes(k), B, offsets, idx);
  std::vector<at::Tensor> packed;
  packed.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    const at::Tensor src = with_dense_rows(t);
    at::Tensor out = empty_rows_like(t, n);
    gather_rows(src, out, idx, n);
    packed.push_back(std::move(out));
  }
  return {std::move(index), std::move(packed)};
}

void compact_into_cpu(const at::Tensor& keep, at::TensorList tensors, at::TensorList outs, const at::Tensor& index_out,
                      const at::Tensor& count_out) {
  check_compact_into(keep, tensors, outs, index_out, count_out);
  const int64_t B = keep.size(0);
  const at::Tensor k = keep.contiguous();
  std::vector<int64_t> offsets;
  const int64_t n = count_kept(mask_bytes(k), B, offsets);
  int64_t* idx = index_out.mutable_data_ptr<int64_t>();
  fill_index(mask_bytes(k), B, offsets, idx);
  *count_out.mutable_data_ptr<int64_t>() = n;
  for (size_t i = 0; i < tensors.size(); ++i) gather_rows(with_dense_rows(tensors[i]), outs[i], idx, n);
}

// Stable in-place compaction: row r moves to row (kept rows before r) <= r, so walking upward
// never overwrites a row not yet read. One thread: concurrent upward moves would race.
void compact_inplace_cpu(const at::Tensor& keep, at::TensorList tensors) {
  const int64_t B = check_mask(keep, "keep");
  check_rows(tensors, B, keep, "tensors");
  for (size_t i = 0; i < tensors.size(); ++i) check_writable_rows(tensors[i], "tensors", i);
  const at::Tensor k = keep.contiguous();
  const uint8_t* kp = mask_bytes(k);
  for (const at::Tensor& t : tensors) {
    const int64_t rb = row_bytes(t), rs = row_stride_bytes(t);
    if (rb == 0) continue;
    char* base = static_cast<char*>(t.mutable_data_ptr());
    int64_t dst = 0;
    for (int64_t r = 0; r < B;) {
      if (!kp[r]) {
        ++r;
        continue;
      }
      int64_t len = 1;  // a run of kept rows moves in one call when rows are packed back to back
      if (rs == rb)
        while (r + len < B && kp[r + len]) ++len;
      if (dst != r) {
        if (rs == rb)
          std::memmove(base + dst * rs, base + r * rs, static_cast<size_t>(len * rb));
        else
          for (int64_t j = 0; j < len; ++j) std::memcpy(base + (dst + j) * rs, base + (r + j) * rs, static_cast<size_t>(rb));
      }
      dst += len;
      r += len;
    }
  }
}

void scatter_rows_cpu(const at::Tensor& mask, const at::Tensor& rows, at::TensorList srcs, at::TensorList outs) {
  check_scatter(mask, rows, srcs, outs);
  const int64_t B = mask.size(0);
  const at::Tensor m = mask.contiguous();
  const at::Tensor rw = rows.contiguous();
  const uint8_t* mp = mask_bytes(m);
  const int64_t* rp = rw.const_data_ptr<int64_t>();
  // Destination rows are checked once, up front, so no output is half-written on a bad index.
  int64_t lo = 0, hi = -1;
  bool any = false;
  for (int64_t i = 0; i < B; ++i)
    if (mp[i]) {
      lo = any ? std::min(lo, rp[i]) : rp[i];
      hi = any ? std::max(hi, rp[i]) : rp[i];
      any = true;
    }
  if (!any) return;
  for (size_t j = 0; j < outs.size(); ++j)
    TORCH_CHECK_INDEX(lo >= 0 && hi < outs[j].size(0), "scatter_rows: rows holds ", lo < 0 ? lo : hi,
                      " for a masked row but outs[", j, "] has ", outs[j].size(0), " rows");
  for (size_t j = 0; j < srcs.size(); ++j) {
    const at::Tensor& o = outs[j];
    // A dtype change goes through one conversion of the source, as the reference's .to(out dtype).
    const at::Tensor s = with_dense_rows(srcs[j].scalar_type() == o.scalar_type() ? srcs[j] : srcs[j].to(o.scalar_type()));
    const int64_t rb = row_bytes(o);
    if (rb == 0) continue;
    const char* sp = static_cast<const char*>(s.const_data_ptr());
    char* dp = static_cast<char*>(o.mutable_data_ptr());
    const int64_t ss = row_stride_bytes(s), ds = row_stride_bytes(o);
    at::parallel_for(0, B, rows_per_task(rb), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (mp[i]) std::memcpy(dp + rp[i] * ds, sp + i * ss, static_cast<size_t>(rb));
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(eeruntime, CPU, m) {
  m.impl("compact", &compact_cpu);
  m.impl("compact_into", &compact_into_cpu);
  m.impl("compact_", &compact_inplace_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
}

}  // namespace eeruntime
