#include "compact_common.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace eeruntime {

namespace {
std::atomic<int64_t> fused_max_rows{kFusedCompactMaxRows};
}  // namespace

int64_t fused_compact_max_rows() { return fused_max_rows.load(std::memory_order_relaxed); }

int64_t set_fused_compact_max_rows(int64_t rows) {
  return fused_max_rows.exchange(rows < 0 ? kFusedCompactMaxRows : rows, std::memory_order_relaxed);
}

bool rows_are_dense(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    const int64_t size = t.size(d);
    if (size == 0) return true;  // an empty row is trivially dense
    if (size != 1 && t.stride(d) != expected) return false;
    expected *= size;
  }
  return true;
}

at::Tensor with_dense_rows(const at::Tensor& t) { return rows_are_dense(t) ? t : t.contiguous(); }

int64_t row_bytes(const at::Tensor& t) {
  int64_t numel = 1;
  for (int64_t d = 1; d < t.dim(); ++d) numel *= t.size(d);
  return numel * static_cast<int64_t>(t.element_size());
}

int64_t row_stride_bytes(const at::Tensor& t) { return t.stride(0) * static_cast<int64_t>(t.element_size()); }

namespace {

void check_strided(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, what, "[", i, "] has layout ", t.layout(),
                    "; only dense (strided) tensors are supported");
}

}  // namespace

// Output rows are written in place, so they must be dense and must not overlap each other.
void check_writable_rows(const at::Tensor& o, const char* what, size_t i) {
  TORCH_CHECK_VALUE(rows_are_dense(o), what, "[", i, "] with shape ", o.sizes(), " and strides ", o.strides(),
                    " is not dense within a row; pass a tensor whose dims after 0 are contiguous "
                    "(e.g. .contiguous())");
  TORCH_CHECK_VALUE(o.size(0) <= 1 || o.stride(0) * o.element_size() >= row_bytes(o), what, "[", i,
                    "] has overlapping rows (stride ", o.stride(0), " in dim 0); pass a tensor with distinct rows");
}

int64_t check_mask(const at::Tensor& mask, const char* name) {
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.dim() == 1, name,
                    " must be a 1-D bool tensor, got dtype ", mask.scalar_type(), " and shape ", mask.sizes());
  return mask.size(0);
}

void check_rows(at::TensorList tensors, int64_t B, const at::Tensor& mask, const char* what) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == B, what, "[", i, "] has shape ", t.sizes(),
                      "; every tensor must have batch size ", B, " in dim 0");
    TORCH_CHECK_VALUE(t.device() == mask.device(), what, "[", i, "] is on ", t.device(), " but the mask is on ",
                      mask.device());
    check_strided(t, what, i);
  }
}

void check_compact_into(const at::Tensor& keep, at::TensorList tensors, at::TensorList outs,
                        const at::Tensor& index_out, const at::Tensor& count_out) {
  const int64_t B = check_mask(keep, "keep");
  check_rows(tensors, B, keep, "tensors");
  TORCH_CHECK_VALUE(outs.size() == tensors.size(), "got ", tensors.size(), " tensors but ", outs.size(),
                    " output buffers");
  for (size_t i = 0; i < outs.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const at::Tensor& o = outs[i];
    TORCH_CHECK_VALUE(o.dim() == t.dim() && o.size(0) >= B && o.sizes().slice(1) == t.sizes().slice(1) &&
                          o.scalar_type() == t.scalar_type() && o.device() == t.device(),
                      "outs[", i, "] is ", o.sizes(), " ", o.scalar_type(), " on ", o.device(), "; it must hold >= ", B,
                      " rows of ", t.sizes().slice(1), " ", t.scalar_type(), " on ", t.device());
    check_strided(o, "outs", i);
    check_writable_rows(o, "outs", i);
  }
  TORCH_CHECK_VALUE(index_out.scalar_type() == at::kLong && index_out.dim() == 1 && index_out.size(0) >= B &&
                        index_out.device() == keep.device(),
                    "index_out must be int64 [>= ", B, "] on ", keep.device(), ", got ", index_out.scalar_type(), " ",
                    index_out.sizes(), " on ", index_out.device());
  TORCH_CHECK_VALUE(index_out.size(0) <= 1 || index_out.stride(0) == 1,
                    "index_out must be contiguous, got stride ", index_out.stride(0));
  TORCH_CHECK_VALUE(count_out.scalar_type() == at::kLong && count_out.numel() == 1 &&
                        count_out.device() == keep.device(),
                    "count_out must be a one-element int64 tensor on ", keep.device(), ", got ",
                    count_out.scalar_type(), " ", count_out.sizes(), " on ", count_out.device());
}

void check_scatter(const at::Tensor& mask, const at::Tensor& rows, at::TensorList srcs, at::TensorList outs) {
  const int64_t B = check_mask(mask, "mask");
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.size(0) == B &&
                        rows.device() == mask.device(),
                    "rows must be int64 [", B, "] on ", mask.device(), ", got ", rows.scalar_type(), " ", rows.sizes(),
                    " on ", rows.device());
  check_rows(srcs, B, mask, "srcs");
  TORCH_CHECK_VALUE(outs.size() == srcs.size(), "got ", srcs.size(), " sources but ", outs.size(), " outputs");
  for (size_t i = 0; i < outs.size(); ++i) {
    const at::Tensor& s = srcs[i];
    const at::Tensor& o = outs[i];
    TORCH_CHECK_VALUE(o.dim() == s.dim() && o.sizes().slice(1) == s.sizes().slice(1) && o.device() == s.device(),
                      "outs[", i, "] ", o.sizes(), " on ", o.device(), " does not match srcs[", i, "] ", s.sizes(),
                      " on ", s.device(), "; outputs need the sources' trailing shape and device");
    check_strided(o, "outs", i);
    check_writable_rows(o, "outs", i);
  }
}

}  // namespace eeruntime
