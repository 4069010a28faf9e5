// The prefrank._C module: the private `prefrank_C` kernel library plus a tiny Python module object.
//
// Kernels are declared per op family with TORCH_LIBRARY_FRAGMENT(prefrank_C, m) in their *_cpu.cpp file and
// implemented per dispatch key (CPU there, CUDA in *_cuda_glue.cpp). Users never call them: the public ops
// `torch.ops.prefrank.*` are torch.library.custom_ops defined in Python (prefrank/<family>.py) whose
// cpu/cuda kernels call these (or the Triton launchers). The Python module only carries build facts that
// prefrank._extension checks at import (a stale build raises an ImportError with the rebuild command).
#include <Python.h>
#include <torch/library.h>

#include "prefrank_source_hash.h"  // written by setup.py into build/generated

TORCH_LIBRARY(prefrank_C, m) {}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_C", "prefrank compiled operators", -1, nullptr};
  PyObject* module = PyModule_Create(&definition);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "source_hash", PREFRANK_SOURCE_HASH);
  PyModule_AddIntConstant(module, "with_cuda", PREFRANK_WITH_CUDA);
  return module;
}
