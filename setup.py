"""Builds vqkernels._C: the C++ CPU ops always, the CUDA ops only when torch is a CUDA build and CUDA_HOME is set.

Environment switches:
  VQK_BUILD_CUDA=auto|1|0   auto (default): build CUDA ops when possible and say why not otherwise;
                            1: fail if they cannot be built; 0: never build them.
  VQK_NO_EXT=1              build no extension at all (the pure-PyTorch backend still works).
  MAX_JOBS                  parallel compile jobs (torch.utils.cpp_extension).
"""

import glob
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[vqkernels setup] {msg}", file=sys.stderr)


def _extensions():
    if os.environ.get("VQK_NO_EXT", "0") == "1":
        _say("VQK_NO_EXT=1: building no C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable: install torch first and build with --no-build-isolation")
        raise

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    cpp_sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    cuda_sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    )
    mode = os.environ.get("VQK_BUILD_CUDA", "auto").lower()
    why_not = None
    if mode in ("0", "false", "no", "off"):
        why_not = "VQK_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        why_not = "CUDA_HOME is not set and nvcc was not found"
    elif not cuda_sources:
        why_not = "csrc/cuda has no .cu or .cpp sources"
    if why_not is not None and mode in ("1", "true", "yes", "on"):
        raise RuntimeError(f"VQK_BUILD_CUDA=1 but the CUDA ops cannot be built: {why_not}")

    # torch >= 2.14's headers require C++20 (ATen.h #errors otherwise); older torch builds as C++17, as before
    major_minor = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    std = "-std=c++20" if major_minor >= (2, 14) else "-std=c++17"
    cxx = ["-O3", std, "-fopenmp", "-Wall", "-Wno-unused-function"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    if why_not is None:
        # WMMA bf16 and __match_any_sync need sm_80+; default to the data-centre GPUs we target
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        _say(f"building CPU + CUDA ops (torch CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        ext = CUDAExtension(
            "vqkernels._C",
            cpp_sources + cuda_sources,
            define_macros=define_macros + [("VQK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", std, "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        _say(f"building CPU ops only: {why_not}")
        ext = CppExtension(
            "vqkernels._C",
            cpp_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
