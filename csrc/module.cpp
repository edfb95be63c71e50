// Python module stub so that `import vqkernels._C` loads the library and runs its op registrations.
#include <Python.h>

namespace vqkernels::cpu {
const char* bf16_tile_kernel();  // csrc/cpu/search.cpp
}

static struct PyModuleDef vqk_module = {PyModuleDef_HEAD_INIT, "_C", "vqkernels C++/CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&vqk_module);
#ifdef VQK_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cpu_bf16_tile_kernel", vqkernels::cpu::bf16_tile_kernel());
  return m;
}
