"""fastdec._C, the compiled extension (C++ and CUDA kernels, csrc/), when it was built: ``EXTENSION`` is the module
or None, and ``EXTENSION_ERROR`` None or why it did not load. Loading it registers its ops' CPU/CUDA kernels."""

from __future__ import annotations

import torch  # noqa: F401 (first: it loads the libraries fastdec._C links against, libc10.so among them)

try:
    from fastdec import _C as EXTENSION

    EXTENSION_ERROR: str | None = None
except ImportError as error:
    EXTENSION = None
    EXTENSION_ERROR = f"fastdec._C not built ({error})"
