"""One file per op: every kernels/<op>.py is found, registered and reported, and the checks, benchmarks and fixtures
read it; a new op file is picked up by all of them with no other edit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import run_python

from fastdec import ops

ROOT = Path(__file__).resolve().parents[1]
OP_FILES = sorted(path.stem for path in (ROOT / "kernels").glob("*.py") if not path.stem.startswith("_"))


def load_script(path: Path, name: str):
    """A file of this checkout as module `name` (in sys.modules too: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_op_file_is_registered_reported_and_checked():
    assert list(ops.OP_MODULES) == OP_FILES == list(ops.backends())
    for name, module in ops.OP_MODULES.items():
        assert isinstance(getattr(torch.ops.fastdec, name), torch._ops.OpOverloadPacket), name
        assert getattr(ops, name) is getattr(module, name), name
        assert callable(module.check_call) and callable(getattr(module, f"{name}_reference")), name
    assert ops.TRITON_OPS == ("attention", "group_norm_act", "patch_unembed", "rms_norm_act")
    launchers = load_script(ROOT / "tests" / "conftest.py", "discovered_conftest").LAUNCHERS
    assert [(module.__name__, name) for module, name in launchers] == [
        (f"fastdec.kernels.{op}", f"{op}_triton") for op in ops.TRITON_OPS]
    assert all(callable(getattr(module, name)) for module, name in launchers)
    compile_check = load_script(ROOT / "bench" / "compile_check.py", "discovered_compile_check")
    assert [module.__name__ for module in compile_check.KERNEL_MODULES] == [
        f"fastdec.kernels.{op}" for op in ops.TRITON_OPS]
    assert load_script(ROOT / "bench" / "gpu_check.py", "discovered_gpu_check").CHECKED_OPS == (
        "attention", "group_norm_act", "patch_unembed", "pixel_shuffle", "rms_norm_act")  # issue 21: rms_norm_act too


TOY_OP = '''
"""y = 2 x: the least an op file holds."""
from __future__ import annotations

import torch

from fastdec.kernels.support.cases import CompileCase, GpuCase, cuda_empty
from fastdec.kernels.support.dispatch import cpu_kernel
from fastdec.kernels.support.triton_import import tl, triton


@triton.jit
def _toy_double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)


def toy_double_triton(x):
    out = torch.empty_like(x)
    _toy_double_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    return out


def toy_double_reference(x):
    return x * 2


FUSED, GPU_DTYPE = "triton", torch.float16


@torch.library.custom_op("fastdec::toy_double", mutates_args=(), device_types="cpu")
def toy_double(x: torch.Tensor) -> torch.Tensor:
    return cpu_kernel(toy_double_triton, toy_double_reference)(x)


def check_call(r):
    return (r(3, 5),)


def compile_cases(quick):
    return [CompileCase("fp32 3x5", lambda: toy_double_triton(cuda_empty((3, 5), "fp32")))]


def gpu_cases(device, dtype, smoke):
    return [GpuCase("(3, 5)", lambda: (torch.randn(3, 5, device=device, dtype=dtype),), {}, nbytes=60)]
'''

REPORT = '''
import contextlib, importlib.util, io, json, sys
import torch
from fastdec import cli, ops

def load(path):
    spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[1][:-3], path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

compile_check, gpu_check, conftest = (load(f"{ROOT}/{path}") for path in
                                      ("bench/compile_check.py", "bench/gpu_check.py", "tests/conftest.py"))
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    cli.main(["check"])
toy = ops.OP_MODULES["toy_double"]
configs = compile_check.op_configs(toy, 90, quick=True) if compile_check.TRITON_IMPORT_ERROR is None else None
print(json.dumps({
    "registered": hasattr(torch.ops.fastdec, "toy_double"), "entry": ops.toy_double(torch.ones(2)).tolist(),
    "backends": list(ops.backends()), "triton_ops": ops.TRITON_OPS,
    "check": sorted({line.split()[1] for line in printed.getvalue().splitlines() if line[:4] in ("ok  ", "skip")}),
    "compile_check": [module.__name__ for module in compile_check.KERNEL_MODULES],
    "compiled": configs and [[launch.kernel.__name__ for launch in config.launches] for config in configs],
    "gpu_check": gpu_check.CHECKED_OPS, "launchers": [name for _, name in conftest.LAUNCHERS],
}))
'''


def package_with(folder: Path, name: str, op_file: str) -> None:
    """folder/fastdec: this checkout's package (links to its files) whose kernels/ holds one more file."""
    package = folder / "fastdec"
    package.mkdir()
    for entry in (ROOT / "fastdec").iterdir():
        if entry.name not in ("kernels", "__pycache__"):
            (package / entry.name).symlink_to(entry)
    (package / "kernels").mkdir()
    for source in (ROOT / "kernels").iterdir():  # the op files and support/
        if source.name != "__pycache__":
            (package / "kernels" / source.name).symlink_to(source)
    (package / "kernels" / name).write_text(op_file)


def test_a_new_op_file_is_all_it_takes(tmp_path):
    package_with(tmp_path, "toy_double.py", TOY_OP)
    env = {"FASTDEC_TRITON_INTERPRET": "0", "TRITON_INTERPRET": "0", "PYTHONDONTWRITEBYTECODE": "1"}  # no interpreter
    report = json.loads(run_python(REPORT.replace("{ROOT}", str(ROOT)), env_extra=env, cwd=tmp_path))
    assert report["registered"] and report["entry"] == [2.0, 2.0]
    names = sorted([*OP_FILES, "toy_double"])
    assert report["backends"] == names and report["check"] == names
    assert "toy_double" in report["triton_ops"] and "toy_double_triton" in report["launchers"]
    assert "fastdec.kernels.toy_double" in report["compile_check"] and "toy_double" in report["gpu_check"]
    assert report["compiled"] in (None, [["_toy_double_kernel"]])  # None: no triton here


def test_an_op_file_without_its_declarations_is_refused(tmp_path):
    package_with(tmp_path, "half_done.py", "def half_done(x):\n    return x\n")
    done = subprocess.run([sys.executable, "-c", "import fastdec"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    assert done.returncode == 1
    assert ("ImportError: kernels/half_done.py is an op file (its name has no leading _) but does not define "
            'half_done_reference, check_call, FUSED = "triton" or "extension"; see fastdec/ops.py') in done.stderr


def test_host_side_launch_arithmetic_matches_triton():
    """Launchers size grids with kernels/support/triton_import.py's cdiv and next_power_of_2 (plain Python:
    triton.cdiv is a constexpr function costing microseconds per host call); both agree with triton's."""
    import pytest

    from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, cdiv, next_power_of_2, triton

    if TRITON_IMPORT_ERROR is not None:
        pytest.skip(TRITON_IMPORT_ERROR)
    for a in range(1, 300):
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 7, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
