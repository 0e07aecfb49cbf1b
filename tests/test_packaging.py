"""How fastdec is found and installed: from the checkout (editable install, any working directory, never hiding
another package) and from a wheel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_python

import fastdec
import fastdec.kernels.attention
from fastdec import ops

ROOT = Path(__file__).resolve().parents[1]


def test_only_fastdec_is_a_top_level_package_of_the_checkout():
    """``python`` run from the checkout puts it first on sys.path: a folder there with an __init__.py would be
    imported in place of any installed package of that name (kernels/ hid PyPI's ``kernels``, which diffusers
    imports). Namespace folders (no __init__.py) never beat a regular package."""
    packages = sorted(path.parent.name for path in ROOT.glob("*/__init__.py") if not path.parent.is_symlink())
    assert packages == ["fastdec"], f"top-level folders importable under their own name: {packages}"


def test_installed_package_wins_over_a_repository_folder_from_the_root(tmp_path):
    """A package named like a repository folder (kernels, bench, tests, weights), installed elsewhere, is the one
    ``import`` finds in a process whose working directory is the root; fastdec still imports its own kernels."""
    site = tmp_path / "site"
    for name in ("kernels", "bench", "tests", "weights"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"OWNER = 'other {name}'\n")
    out = run_python(
        "import kernels, bench, tests, weights, fastdec, fastdec.kernels.attention as a\n"
        "print(kernels.OWNER, bench.OWNER, tests.OWNER, weights.OWNER, sep=',')\n"
        "print(a.__name__)\n",
        env_extra={"PYTHONPATH": str(site)}, cwd=ROOT,
    )
    assert out.splitlines() == ["other kernels,other bench,other tests,other weights", "fastdec.kernels.attention"]


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
def test_diffusers_imports_from_the_root():
    """What broke CI: diffusers imports PyPI's ``kernels`` (a transformers dependency) when it is installed."""
    out = run_python("import diffusers.models.autoencoders.autoencoder_kl, fastdec, kernels\n"
                     "print(kernels.__name__, kernels.__spec__.origin is not None)", cwd=ROOT)
    installed = importlib.util.find_spec("kernels") is not None and importlib.util.find_spec("kernels").origin
    assert out.split() == ["kernels", "True" if installed else "False"]


def test_editable_install_maps_kernels_folder():
    assert [Path(p).resolve() for p in fastdec.kernels.__path__] == [ROOT / "kernels"]
    assert Path(fastdec.kernels.attention.__file__).resolve().parent == ROOT / "kernels"
    assert fastdec.ops.EXTENSION is not None, fastdec.ops.EXTENSION_ERROR
    assert ops.backends()["attention"]


@pytest.mark.slow
def test_wheel_install_imports(tmp_path):
    """Build a wheel (C++ part only, to keep it quick), install it into an empty folder, import from there."""
    env = {**os.environ, "FASTDEC_BUILD_CUDA": "0", "MAX_JOBS": "2"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, env=env, timeout=900, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fastdec-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    out = run_python(
        "import fastdec, fastdec.kernels.attention, fastdec.ops as o; from fastdec.api import shipped_weights; "
        "print(fastdec.__file__, fastdec.kernels.attention.__file__, o.EXTENSION is not None, "
        "o.EXTENSION.built_with_cuda(), sorted(shipped_weights())[0])",
        env_extra={"PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path,
    )
    package_file, kernels_file, has_ext, with_cuda, weights = out.split()
    assert Path(package_file).is_relative_to(tmp_path / "site")
    assert Path(kernels_file).is_relative_to(tmp_path / "site" / "fastdec" / "kernels")
    assert has_ext == "True" and with_cuda == "False"
    assert weights == "efficientvit-taef2"


def test_builds_without_a_gpu_embed_ptx_for_newer_gpus():
    """Issue 21: sm_80/sm_90 machine code alone gives Blackwell "no kernel image"; the default list ends in +PTX
    (of sm_100 when nvcc knows it, CUDA >= 12.8)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "default_arch_list"]
    scope: dict = {}
    exec(compile(ast.Module([function], []), "setup.py", "exec"), scope)
    assert scope["default_arch_list"]((12, 4)) == "8.0;9.0+PTX"
    assert scope["default_arch_list"]((12, 8)) == "8.0;9.0;10.0+PTX"
    assert scope["default_arch_list"]((13, 0)) == "8.0;9.0;10.0+PTX"
    assert scope["default_arch_list"](None) == "8.0;9.0+PTX"
