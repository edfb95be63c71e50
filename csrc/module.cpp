// Python module stub so that `import vqkernels._C` loads the library and runs its op registrations. It also
// carries the constants of csrc/numerics.h (so that a test can check them against vqkernels/numerics.py) and the
// CPU op's kernel choice (csrc/cpu/cpu_features.h; vqkernels._ext wraps these functions).
#include <Python.h>

#include <exception>
#include <stdexcept>
#include <string>

#include "cpu/cpu_features.h"
#include "numerics.h"

namespace cpu = vqkernels::cpu;

namespace {

// A C++ exception as the Python exception it means (ValueError for a bad argument), or nullptr when f returned.
template <typename F>
PyObject* call_str(F&& f) {
  try {
    const std::string s = f();
    return PyUnicode_FromString(s.c_str());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// rows: the input rows of the search the plan is for (a large default: the common case of big batches)
constexpr long long kDefaultRows = 1 << 20;

PyObject* py_cpu_plan(PyObject*, PyObject* args) {
  const char* dtype;
  long long rows = kDefaultRows;
  if (!PyArg_ParseTuple(args, "s|L", &dtype, &rows)) return nullptr;
  return call_str([&] { return cpu::cpu_plan(dtype, rows); });
}

PyObject* py_cpu_variants(PyObject*, PyObject* args) {
  const char* dtype;
  long long rows = kDefaultRows;
  if (!PyArg_ParseTuple(args, "s|L", &dtype, &rows)) return nullptr;
  return call_str([&] { return cpu::cpu_variants(dtype, rows); });
}

PyObject* py_cpu_features(PyObject*, PyObject*) {
  return call_str([] { return cpu::cpu_features().names(); });
}

// cpu_choose(dtype, features, rows, tile_env, epilogue_env) -> "tile,epilogue": the choice a CPU with those
// features would make for a search of `rows` input rows (None for an override means unset).
PyObject* py_cpu_choose(PyObject*, PyObject* args) {
  const char *dtype, *features, *tile_env = nullptr, *epilogue_env = nullptr;
  long long rows;
  if (!PyArg_ParseTuple(args, "ssL|zz", &dtype, &features, &rows, &tile_env, &epilogue_env)) return nullptr;
  return call_str([&] {
    const cpu::CpuFeatures f = cpu::features_from_names(features);
    return cpu::tile_name(cpu::choose_tile(dtype, f, tile_env, nullptr, rows), dtype, f) + "," +
           cpu::epilogue_name(cpu::choose_epilogue(dtype, f, epilogue_env));
  });
}

PyMethodDef methods[] = {
    {"cpu_plan", py_cpu_plan, METH_VARARGS,
     "cpu_plan(dtype, rows=2**20) -> 'tile,epilogue' a search of `rows` input rows runs now"},
    {"cpu_variants", py_cpu_variants, METH_VARARGS,
     "cpu_variants(dtype, rows=2**20) -> 'tile,epilogue;...' every combination this CPU can run, the automatic one "
     "first"},
    {"cpu_features", py_cpu_features, METH_NOARGS, "cpu_features() -> comma list of the detected CPU features"},
    {"cpu_choose", py_cpu_choose, METH_VARARGS,
     "cpu_choose(dtype, features, rows, tile_env=None, epilogue_env=None) -> 'tile,epilogue' for a CPU with "
     "features"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef vqk_module = {PyModuleDef_HEAD_INIT, "_C", "vqkernels C++/CUDA ops", -1, methods, nullptr, nullptr,
                          nullptr, nullptr};

int add_double(PyObject* m, const char* name, double v) {
  PyObject* f = PyFloat_FromDouble(v);
  if (f == nullptr) return -1;
  if (PyModule_AddObject(m, name, f) < 0) {  // steals f only on success
    Py_DECREF(f);
    return -1;
  }
  return 0;
}

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&vqk_module);
  if (m == nullptr) return nullptr;
  namespace num = vqkernels::numerics;
#ifdef VQK_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "with_cuda", with_cuda) < 0 || add_double(m, "cos_eps", num::kCosEps) < 0 ||
      add_double(m, "exact_safety", num::kExactSafety) < 0 ||
      PyModule_AddIntConstant(m, "exact_candidates", num::kExactCandidates) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
