"""Builds fastdec and its extension fastdec._C (C++ CPU kernels always, CUDA kernels when possible).

FASTDEC_BUILD_CUDA=0|1 forces the CUDA part off/on; by default it is built when torch has CUDA and nvcc is found.
The Triton kernels in kernels/ ship as the subpackage fastdec.kernels: fastdec/kernels is a link to ../kernels, and
neither kernels/ nor weights/ holds an __init__.py, so no folder of the repository is a top-level package (``python``
run from the checkout puts it first on sys.path, where a kernels/__init__.py would hide PyPI's ``kernels``).
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup


def _has_cudart(home: str) -> bool:
    return any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib"))


def _guess_cuda_home() -> None:
    # torch guesses CUDA_HOME as two folders above `which nvcc`. When nvcc is a link or a wrapper script in
    # /usr/local/bin that gives /usr/local, which has no libcudart: follow the link, else try /usr/local/cuda.
    nvcc = shutil.which("nvcc")
    if not nvcc or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if _has_cudart(home):
            os.environ["CUDA_HOME"] = home
            return


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("FASTDEC_BUILD_CUDA")
    if flag not in (None, "", "0", "1"):
        raise SystemExit(f"FASTDEC_BUILD_CUDA must be 0 or 1, got {flag!r}")
    import torch

    found = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if flag == "1" and not found:
        raise SystemExit("FASTDEC_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
    return found if flag in (None, "") else flag == "1"


def _nvcc_version() -> tuple[int, int] | None:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, TypeError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def default_arch_list(nvcc: tuple[int, int] | None) -> str:
    """TORCH_CUDA_ARCH_LIST without a GPU: sm_80 and sm_90 machine code, and PTX of the newest architecture this
    nvcc knows (10.0 from CUDA 12.8 on, else 9.0), which any newer GPU's driver compiles at load."""
    return "8.0;9.0;10.0+PTX" if nvcc is not None and nvcc >= (12, 8) else "8.0;9.0+PTX"


def _extensions():
    _guess_cuda_home()  # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3"]  # torch adds the C++ standard its headers need (17 or 20)
    if not _want_cuda():
        return [CppExtension("fastdec._C", sources, extra_compile_args={"cxx": cxx})]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect: machine code for Ampere and Hopper rather than torch's long default list, plus PTX so
        # that newer GPUs (Blackwell sm_100/sm_120) JIT-compile it instead of failing with "no kernel image".
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(_nvcc_version())
    nvcc = ["-O3", "-lineinfo"]
    return [
        CUDAExtension(
            "fastdec._C",
            sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("FASTDEC_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    # fastdec and every subpackage under fastdec/ (models, train, batch, ...), plus kernels/ as fastdec.kernels
    # (through the link fastdec/kernels) and the trained decoders in weights/ as fastdec/weights/ (package data;
    # fastdec.load finds them by name).
    packages=["fastdec", *(f"fastdec.{name}" for name in find_packages("fastdec")), "fastdec.kernels",
              "fastdec.kernels.support",
              "fastdec.weights"],
    package_dir={"fastdec": "fastdec", "fastdec.weights": "weights"},
    package_data={"fastdec.weights": ["*/config.json", "*/model.safetensors", "*/model_card.json", "*.md"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
