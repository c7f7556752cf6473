// CUDA binding of the eeruntime compaction ops: checks the tensors, then calls the torch-free
// kernels of csrc/cuda/compact_kernels.cu with raw pointers on the current stream.
//
// compact_into and scatter_rows never synchronise with the host (graph-capturable): CUB's scratch
// comes from torch's caching allocator and the kernels read the kept count from device memory.
// compact_into takes one fused kernel (select + index + count + first tensor's copy, no scratch)
// up to fused_compact_max_rows() rows (compact_common.h), CUB's select + gathers above it.
// compact syncs once, to read the count that sizes its outputs.
#ifdef EERUNTIME_WITH_CUDA

#include "compact_common.h"
#include "cuda/compact_kernels.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <climits>
#include <tuple>
#include <vector>

namespace eeruntime {
namespace {

// Blocks per SM for the copy kernels' grids (256 threads each): two waves of fully occupied SMs;
// grid-stride loops cover larger batches.
constexpr int kBlocksPerSm = 16;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "eeruntime: ", what, " failed: ", cudaGetErrorString(err));
}

// SMs of the current device (the attribute query is cheap and allowed during capture).
int sm_count() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count query");
  return sms;
}

// Block budget of the copy kernels' grids.
int max_blocks() { return sm_count() * kBlocksPerSm; }

const uint8_t* mask_bytes(const at::Tensor& mask) { return static_cast<const uint8_t*>(mask.const_data_ptr()); }

cuda::RowSpan span(const at::Tensor& src, const at::Tensor& dst) {
  return cuda::RowSpan{src.const_data_ptr(), row_stride_bytes(src), dst.mutable_data_ptr(), row_stride_bytes(dst),
                       row_bytes(dst)};
}

// index_out[:n] = kept row numbers (ascending), *count_out = n, all on the device.
void select_kept(const at::Tensor& keep, int64_t* index_out, int64_t* count_out, cudaStream_t stream) {
  const int64_t B = keep.size(0);
  TORCH_CHECK_VALUE(B <= INT_MAX, "the CUDA compaction supports up to ", INT_MAX, " rows, got ", B);
  size_t temp_bytes = 0;
  check_cuda(cuda::select_flagged_temp_bytes(static_cast<int>(B), &temp_bytes), "CUB select (size query)");
  const at::Tensor temp =
      at::empty({static_cast<int64_t>(temp_bytes > 0 ? temp_bytes : 1)}, keep.options().dtype(at::kByte));
  check_cuda(cuda::select_flagged(temp.mutable_data_ptr(), temp_bytes, mask_bytes(keep), static_cast<int>(B),
                                  index_out, count_out, stream),
             "CUB select");
}

std::tuple<at::Tensor, std::vector<at::Tensor>> compact_cuda(const at::Tensor& keep, at::TensorList tensors) {
  const int64_t B = check_mask(keep, "keep");
  check_rows(tensors, B, keep, "tensors");
  const c10::cuda::CUDAGuard guard(keep.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor k = keep.contiguous();
  at::Tensor index = at::empty({B}, keep.options().dtype(at::kLong));
  const at::Tensor count = at::empty({1}, keep.options().dtype(at::kLong));
  int64_t n = 0;
  if (B > 0) {
    select_kept(k, index.mutable_data_ptr<int64_t>(), count.mutable_data_ptr<int64_t>(), stream);
    n = count.item<int64_t>();  // the one host sync: it sizes the outputs
  }
  const int blocks = max_blocks();
  std::vector<at::Tensor> packed;
  packed.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    std::vector<int64_t> sizes = t.sizes().vec();
    sizes[0] = n;
    at::Tensor out = at::empty(sizes, t.options());
    if (n > 0) {
      const at::Tensor src = with_dense_rows(t);
      check_cuda(cuda::gather_rows(span(src, out), index.const_data_ptr<int64_t>(), count.const_data_ptr<int64_t>(), n,
                                   blocks, stream),
                 "row gather");
    }
    packed.push_back(std::move(out));
  }
  return {index.narrow(0, 0, n), std::move(packed)};
}

void compact_into_cuda(const at::Tensor& keep, at::TensorList tensors, at::TensorList outs, const at::Tensor& index_out,
                       const at::Tensor& count_out) {
  check_compact_into(keep, tensors, outs, index_out, count_out);
  const int64_t B = keep.size(0);
  const c10::cuda::CUDAGuard guard(keep.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (B == 0) {
    count_out.zero_();
    return;
  }
  const at::Tensor k = keep.contiguous();
  int64_t* index = index_out.mutable_data_ptr<int64_t>();
  int64_t* count = count_out.mutable_data_ptr<int64_t>();
  size_t first_gathered = 0;
  if (B <= fused_compact_max_rows() && B <= INT_MAX) {
    // One kernel selects, writes index_out and the count, and copies the first tensor (none to
    // copy: a zero-byte span); the other tensors are gathered below by the index it wrote.
    const at::Tensor src = tensors.empty() ? at::Tensor() : with_dense_rows(tensors[0]);  // alive past the launch
    const cuda::RowSpan first = tensors.empty() ? cuda::RowSpan{nullptr, 0, nullptr, 0, 0} : span(src, outs[0]);
    check_cuda(cuda::fused_compact(first, mask_bytes(k), static_cast<int>(B), index, count, sm_count(), stream),
               "fused compaction");
    first_gathered = tensors.empty() ? 0 : 1;
  } else {
    select_kept(k, index, count, stream);
  }
  // Launches are sized by the capacity B; each kernel stops at the count it reads on the device.
  const int blocks = max_blocks();
  for (size_t i = first_gathered; i < tensors.size(); ++i) {
    const at::Tensor src = with_dense_rows(tensors[i]);
    check_cuda(cuda::gather_rows(span(src, outs[i]), index, count, B, blocks, stream), "row gather");
  }
}

void scatter_rows_cuda(const at::Tensor& mask, const at::Tensor& rows, at::TensorList srcs, at::TensorList outs) {
  check_scatter(mask, rows, srcs, outs);
  const int64_t B = mask.size(0);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(mask.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor m = mask.contiguous();
  const at::Tensor rw = rows.contiguous();
  const int blocks = max_blocks();
  for (size_t j = 0; j < srcs.size(); ++j) {
    const at::Tensor& o = outs[j];
    // A dtype change goes through one conversion of the source, as the reference's .to(out dtype).
    const at::Tensor s =
        with_dense_rows(srcs[j].scalar_type() == o.scalar_type() ? srcs[j] : srcs[j].to(o.scalar_type()));
    check_cuda(cuda::scatter_rows(span(s, o), mask_bytes(m), rw.const_data_ptr<int64_t>(), B, o.size(0), blocks, stream),
               "row scatter");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(eeruntime, CUDA, m) {
  m.impl("compact", &compact_cuda);
  m.impl("compact_into", &compact_into_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace eeruntime

#endif  // EERUNTIME_WITH_CUDA
