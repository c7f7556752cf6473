// The eeruntime operator library (torch.ops.eeruntime.*) and the Python module eeruntime._C.
//
// Schemas are defined once here; csrc/compact_cpu.cpp and csrc/exit_decision_cpu.cpp register the
// CPU kernels and, in a CUDA build, csrc/compact_cuda.cpp the CUDA ones. The fake (meta) kernels
// that torch.compile traces are registered in Python (eeruntime/ops/_ext_backend.py).
#include <Python.h>
#include <torch/library.h>

#include "compact_common.h"

TORCH_LIBRARY(eeruntime, m) {
  // (index int64 [n], [t[index] for t in tensors]): the rows where keep is true, in order.
  m.def("compact(Tensor keep, Tensor[] tensors) -> (Tensor, Tensor[])");
  // outs[i][:n] = tensors[i][index], index_out[:n] = index, count_out = n; rows past n untouched.
  m.def(
      "compact_into(Tensor keep, Tensor[] tensors, Tensor(a!)[] outs, Tensor(b!) index_out, "
      "Tensor(c!) count_out) -> ()");
  // In place: rows [:n] of each tensor become its rows where keep is true, in order (n = the number
  // kept); rows past n are left in an unspecified state.
  m.def("compact_(Tensor keep, Tensor(a!)[] tensors) -> ()");
  // outs[j][rows[i]] = srcs[j][i] for every i with mask[i].
  m.def("scatter_rows(Tensor mask, Tensor rows, Tensor[] srcs, Tensor(a!)[] outs) -> ()");
  // (conf float32 [B], exit bool [B], argmax int64 [B], or [0] unless return_argmax) of logits [B, C];
  // the threshold is read from `threshold` (one element, read inside the op) or, when it is None,
  // is threshold_value. criterion: the code of eeruntime.criteria.CRITERION_CODE.
  m.def(
      "exit_decision(Tensor logits, Tensor? threshold, float threshold_value, int criterion, "
      "bool return_argmax) -> (Tensor conf, Tensor mask, Tensor argmax)");
  // One exit of the eager loop: score logits [n, C] (criterion code as above), decide against
  // thresholds[exit] (every row leaves when final), write each leaving row i's logits, score and
  // `exit` at row rows[i] of out / confidence / exit_index; returns (keep = the rows that go on,
  // the number that left, a 0-d int64 tensor).
  m.def(
      "exit_scatter(Tensor logits, Tensor thresholds, int criterion, int exit, bool final, Tensor rows, "
      "Tensor(a!) out, Tensor(b!) confidence, Tensor(c!) exit_index) -> (Tensor keep, Tensor n_exit)");
}

namespace {

// _C._set_fused_compact_max_rows(rows) -> previous: tests and the benchmark pick compact_into's
// CUDA path with it (see set_fused_compact_max_rows in compact_common.h); rows < 0 restores
// FUSED_COMPACT_MAX_ROWS.
PyObject* set_fused_max_rows(PyObject* /*self*/, PyObject* arg) {
  const long long rows = PyLong_AsLongLong(arg);
  if (rows == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLongLong(eeruntime::set_fused_compact_max_rows(rows));
}

PyMethodDef methods[] = {
    {"_set_fused_compact_max_rows", set_fused_max_rows, METH_O,
     "Set compact_into's fused-path row limit (tests and benchmarks only); < 0 restores the default. "
     "Returns the previous limit."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing eeruntime._C loads this library, which registers the ops above with torch.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT,
                                      "_C",
                                      "eeruntime's compiled ops, registered as torch.ops.eeruntime.*",
                                      -1,
                                      methods,
                                      nullptr,
                                      nullptr,
                                      nullptr,
                                      nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef EERUNTIME_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) != 0 ||
      PyModule_AddIntConstant(m, "FUSED_COMPACT_MAX_ROWS", static_cast<long>(eeruntime::kFusedCompactMaxRows)) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}
