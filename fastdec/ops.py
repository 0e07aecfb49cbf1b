"""fastdec's fused ops, ``torch.ops.fastdec.*``: found in kernels/, one file per op, and which backend runs each where.

Every kernels/<name>.py is an op file (what op files share or split out lives in kernels/support/). Importing it
registers ``torch.ops.fastdec.<name>`` (schema, CPU and CUDA kernels, a fake kernel that keeps shape, dtype and
layout, an autograd formula), and it declares:

* ``<name>``: the Python entry, here as ``ops.<name>``, and ``<name>_reference``: the eager reference;
* ``FUSED``: what runs the fused path: "triton" (the launcher is ``<name>_triton``) or "extension" (fastdec._C);
* ``check_call(r)``: the call ``fastdec check`` makes, ``r(*shape)`` a random tensor on the device checked;
  ``compile_cases(quick)`` for bench/compile_check.py (Triton ops) and ``gpu_cases(device, dtype, smoke)`` with
  ``GPU_DTYPE`` for bench/gpu_check.py, when it has them.

So adding an op is its file plus its tests. Dispatch (kernels/support/dispatch.py): CUDA tensors run the fused
kernel; CPU tensors run the C++ kernel or the eager reference, or with ``FASTDEC_TRITON_INTERPRET=1`` (plus
``TRITON_INTERPRET=1``, which fastdec sets if triton is not imported yet) the real Triton kernel through triton's
interpreter, which is how CI checks the kernel code on a machine without a GPU; inside ``with reference_ops():`` the
Triton ops run their eager reference on every device (for parity tests).

When triton or the extension is missing, the op falls back to its eager reference and ``backends()`` says why.
Models call these ops only, never the kernels directly.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from fastdec.kernels.support.dispatch import interpreter_requested, reference_ops  # noqa: F401 (part of this API)
from fastdec.kernels.support.extension import EXTENSION, EXTENSION_ERROR  # noqa: F401 (part of this API)
from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton_interpreting

KERNELS_PACKAGE = "fastdec.kernels"


def _op_files() -> dict[str, ModuleType]:
    """Imports (and so registers) every op file of fastdec.kernels, by op name in name order."""
    package = importlib.import_module(KERNELS_PACKAGE)
    found = {}
    for name in sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.ispkg):
        if name.startswith("_"):  # not an op's name
            continue
        module = importlib.import_module(f"{KERNELS_PACKAGE}.{name}")
        missing = [attr for attr in (name, f"{name}_reference", "check_call") if not hasattr(module, attr)]
        if getattr(module, "FUSED", None) not in ("triton", "extension"):
            missing.append('FUSED = "triton" or "extension"')
        if missing:
            raise ImportError(f"kernels/{name}.py is an op file (its name has no leading _) but does not define "
                              f"{', '.join(missing)}; see fastdec/ops.py")
        found[name] = module
    return found


OP_MODULES: dict[str, ModuleType] = _op_files()
TRITON_OPS = tuple(name for name, module in OP_MODULES.items() if module.FUSED == "triton")
globals().update({name: getattr(module, name) for name, module in OP_MODULES.items()})  # ops.<name>(...)


# --- which backend runs where ------------------------------------------------------------------------------------


def _triton_backends() -> dict[str, str]:
    if TRITON_IMPORT_ERROR is not None:
        reason = f"eager reference: {TRITON_IMPORT_ERROR}"
        return {"cpu": reason, "cuda": reason}
    if triton_interpreting():
        cpu = (
            "triton (interpreter)"
            if interpreter_requested()
            else "eager reference: TRITON_INTERPRET=1 but FASTDEC_TRITON_INTERPRET is not 1"
        )
        return {"cpu": cpu, "cuda": "eager reference: triton is in interpreter mode (TRITON_INTERPRET=1)"}
    cpu = "eager reference"
    if interpreter_requested():
        cpu += ": FASTDEC_TRITON_INTERPRET=1 but triton was imported before TRITON_INTERPRET=1 was set"
    return {"cpu": cpu, "cuda": "triton"}


def _extension_backends() -> dict[str, str]:
    if EXTENSION is None:
        reason = f"eager reference: {EXTENSION_ERROR}"
        return {"cpu": reason, "cuda": reason}
    cuda = "CUDA (fastdec._C)" if EXTENSION.built_with_cuda() else "eager reference: fastdec._C built without CUDA"
    return {"cpu": "C++ (fastdec._C)", "cuda": cuda}


def backends() -> dict[str, dict[str, str]]:
    """Per op, which backend runs on CPU and on CUDA in this process, and why when it is a fallback."""
    return {name: (_triton_backends if module.FUSED == "triton" else _extension_backends)()
            for name, module in OP_MODULES.items()}


def format_backends() -> str:
    """backends() as a markdown table."""
    rows = ["| op | CPU | CUDA |", "|---|---|---|"]
    rows += [f"| `{name}` | {b['cpu']} | {b['cuda']} |" for name, b in backends().items()]
    return "\n".join(rows)
