"""Import triton if it is installed; otherwise stand-ins that let kernel modules import (their references still work).

``TRITON_IMPORT_ERROR`` is None when triton imported, else the reason it did not. ``fastdec.ops`` never calls a
launcher when it is set. When FASTDEC_TRITON_INTERPRET=1 and triton is not imported yet, TRITON_INTERPRET=1 is set
here, because triton reads it when a kernel is decorated.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("FASTDEC_TRITON_INTERPRET") == "1" and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: str | None = None
except ImportError as error:  # triton is optional: CPU-only installs and platforms without it
    TRITON_IMPORT_ERROR = f"triton not installed ({error})"

    class _MissingTriton:
        """A ``triton.jit`` that keeps kernel definitions importable; launching one raises."""

        @staticmethod
        def jit(kernel):
            def missing(*args, **kwargs):
                raise RuntimeError(f"{kernel.__name__} needs triton: {TRITON_IMPORT_ERROR}")

            return missing

    class _MissingLanguage:
        def __getattr__(self, name):
            return object

    triton = _MissingTriton()
    tl = _MissingLanguage()


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) on the host: triton.cdiv is a constexpr function whose host call costs microseconds each, and
    a launcher makes several per call (the fixed cost that small tensors pay)."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), on the host, with or without triton."""
    return 1 << max(0, n - 1).bit_length()


def triton_interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 seen at import)."""
    return TRITON_IMPORT_ERROR is None and os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["TRITON_IMPORT_ERROR", "cdiv", "next_power_of_2", "tl", "triton", "triton_interpreting"]
