// Python module stub so that `import vqkernels._C` loads the library and runs its op registrations. It also
// carries the constants of csrc/numerics.h, so that a test can check them against vqkernels/numerics.py.
#include <Python.h>

#include "numerics.h"

namespace vqkernels::cpu {
const char* bf16_tile_kernel();  // csrc/cpu/bf16_microkernel.cpp
}

static struct PyModuleDef vqk_module = {PyModuleDef_HEAD_INIT, "_C", "vqkernels C++/CUDA ops", -1, nullptr};

static int add_double(PyObject* m, const char* name, double v) {
  PyObject* f = PyFloat_FromDouble(v);
  if (f == nullptr) return -1;
  if (PyModule_AddObject(m, name, f) < 0) {  // steals f only on success
    Py_DECREF(f);
    return -1;
  }
  return 0;
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&vqk_module);
  if (m == nullptr) return nullptr;
  namespace num = vqkernels::numerics;
#ifdef VQK_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "cpu_bf16_tile_kernel", vqkernels::cpu::bf16_tile_kernel()) < 0 ||
      add_double(m, "cos_eps", num::kCosEps) < 0 || add_double(m, "exact_safety", num::kExactSafety) < 0 ||
      PyModule_AddIntConstant(m, "exact_candidates", num::kExactCandidates) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
