"""Helpers shared by the test modules (``from helpers import ...``, like ``tolerances``)."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastdec import ops
from fastdec.models.taesd import TAESDDecoder

INTERPRETER_HINT = "on CPU set FASTDEC_TRITON_INTERPRET=1 TRITON_INTERPRET=1"


def triton_devices(op: str) -> list[str]:
    """The devices on which ``op``'s Triton kernel (not its reference) runs in this process."""
    table = ops.backends()[op]
    available = {"cpu": table["cpu"] == "triton (interpreter)",
                 "cuda": torch.cuda.is_available() and table["cuda"] == "triton"}
    return [device for device, ok in available.items() if ok]


def needs_triton(*names: str) -> pytest.MarkDecorator:
    """Skip unless the Triton kernel of every op named runs here (CPU through the interpreter, or CUDA)."""
    missing = [name for name in names if not triton_devices(name)]
    return pytest.mark.skipif(bool(missing), reason=f"Triton kernels of {missing} run nowhere here; {INTERPRETER_HINT}")


def fused_on_cpu(*names: str) -> bool:
    return all("cpu" in triton_devices(name) for name in names)


def needs_interpreter(*names: str) -> pytest.MarkDecorator:
    """Skip unless the Triton kernels of every op named run on CPU through the interpreter (CPU-only tests)."""
    reason = f"Triton kernels of {names} do not run on CPU here; {INTERPRETER_HINT}"
    return pytest.mark.skipif(not fused_on_cpu(*names), reason=reason)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in fp64; inf when out has NaN or inf, so a non-finite output never passes."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(ref).all(), "non-finite reference"
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


class CountingKernel:
    """Wraps a @triton.jit kernel and records the grid of each launch (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    @property
    def launches(self) -> int:
        return len(self.grids)

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@torch.no_grad()
def fused_vs_reference_error(model: torch.nn.Module, z: torch.Tensor, launches, expected: dict[str, int]) -> float:
    """relative_error of ``model(z)`` on the fused ops against ``model(z)`` inside ``reference_ops()``, checking that
    the fused run made exactly the ``expected`` Triton launches and the reference run none (``launches`` is the
    ``triton_launches`` fixture)."""
    fused = model(z)
    assert dict(launches) == expected
    with ops.reference_ops():
        reference = model(z)
    assert dict(launches) == expected, "reference_ops() must not launch Triton"
    return relative_error(fused, reference)


def record_kernel_launches(monkeypatch, module, kernels: dict[str, str], reference: str) -> dict[str, CountingKernel]:
    """Wraps each ``module.<kernel>`` (label -> attribute) in a CountingKernel and makes ``module.<reference>``
    raise, so a test proves that only the Triton code ran; returns the counters by label."""

    def reference_must_not_run(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{reference} ran instead of the Triton kernels")

    counters = {label: CountingKernel(getattr(module, attribute)) for label, attribute in kernels.items()}
    for label, attribute in kernels.items():
        monkeypatch.setattr(module, attribute, counters[label])
    monkeypatch.setattr(module, reference, reference_must_not_run)
    return counters


def compile_fullgraph(module, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks that dynamo captures ``module(*args)`` as one graph with no break, then returns (output of the
    fullgraph-compiled module, eager output), both without grad, for the caller's own tolerance."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(*args)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        return compiled(*args), module(*args)


@torch.no_grad()
def jitter(module: torch.nn.Module, picked=lambda name: "norm" in name, scale: float = 0.3) -> torch.nn.Module:
    """Adds ``scale`` * randn_like noise (global RNG, in named_parameters order) to the parameters whose name is
    ``picked``: non-trivial norm affines, which diffusers initialises to 1 and 0. Returns ``module``."""
    for name, param in module.named_parameters():
        if picked(name):
            param.add_(torch.randn_like(param) * scale)
    return module


def edit_weights(folder, edit, file: str = "diffusion_pytorch_model.safetensors") -> None:
    """Loads ``folder / file``'s state dict, lets ``edit`` change it in place and saves it back."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / file
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def edit_config(folder, change: dict) -> None:
    """Rewrites ``folder``'s config.json with the entries of ``change`` added or replaced."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    (Path(folder) / "config.json").write_text(json.dumps({**config, **change}))


def latents(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def save_tiny_taesd(folder, seed: int = 0) -> Path:
    """Saves to ``folder`` (returned) a TAESD decoder with two stages (x2 upsampling, cheap to run), seeded ``seed``."""
    torch.manual_seed(seed)
    TAESDDecoder("taesd", blocks=(1, 1)).save_pretrained(folder)
    return Path(folder)


def make_latent_dataset(root, files: int = 40, side: int = 6) -> tuple:
    """A tiny batch-decoding dataset under ``root``: (folder of ``files`` latent files, saved tiny TAESD decoder).
    Files alternate .safetensors/.pt/.npy and hold one latent (C, h, w) or a batch of 2 or 3; three latent sizes, mixed;
    plus ``corrupt.pt`` (not a tensor file), ``channels16.npy`` (16 channels for a 4-channel decoder) and
    ``nan_batch.pt`` (a batch of 3 whose middle latent is NaN)."""
    from pathlib import Path

    import numpy as np
    from safetensors.torch import save_file

    root = Path(root)
    generator = torch.Generator().manual_seed(0)
    decoder = save_tiny_taesd(root / "decoder")
    folder = root / "latents"
    folder.mkdir()
    for index in range(files):
        count = (None, 2, 3)[index % 3]
        size = side + (2, 0, 1, 0)[index % 4]
        shape = (4, size, size) if count is None else (count, 4, size, size)
        latents = torch.randn(*shape, generator=generator)
        name = folder / f"sample{index:03d}"
        if index % 3 == 0:
            save_file({"latents": latents}, str(name.with_suffix(".safetensors")))
        elif index % 3 == 1:
            torch.save(latents, name.with_suffix(".pt"))
        else:
            np.save(name.with_suffix(".npy"), latents.numpy())
    (folder / "corrupt.pt").write_bytes(b"not a torch file")
    np.save(folder / "channels16.npy", torch.randn(16, side, side, generator=generator).numpy())
    nan_batch = torch.randn(3, 4, side, side, generator=generator)
    nan_batch[1, 0, 0, 0] = float("nan")
    torch.save(nan_batch, folder / "nan_batch.pt")
    return folder, decoder


BATCH_ITEMS = 81  # make_latent_dataset: 79 latents in the 40 sample files + 2 good latents of nan_batch.pt
BATCH_FAILED = {"corrupt", "channels16_000", "nan_batch_001"}


def batch_manifest(out) -> dict[str, dict]:
    """manifest.jsonl of a ``fastdec batch`` output folder by id, checking that no id is listed twice."""
    import json

    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_id = {record["id"]: record for record in records}
    assert len(by_id) == len(records), "an id is listed twice"
    return by_id


def batch_failures(out) -> dict[str, str]:
    import json

    return {r["id"]: r["reason"] for r in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}


def batch_images(out) -> dict[str, bytes]:
    """The image files of an output folder, name -> bytes."""
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.suffix in (".png", ".webp", ".jpg")}


def run_python(code: str, env_extra: dict | None = None, cwd: Path | None = None) -> str:
    """Runs ``python -c code`` in a fresh interpreter (this venv's), asserts it succeeded, returns its stdout."""
    env = {**os.environ, **(env_extra or {})}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensors that ops made and that are still alive, at their peak (``peak``): what a GPU's caching
    allocator counts, without its rounding, workspaces or the CPU's own convolution buffers (a custom op's
    temporaries are not seen, only its outputs)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage address -> bytes
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            if size and address not in inputs and address not in self.live:  # not a view or an in-place result
                self.live[address] = size
                weakref.finalize(storage, self.live.pop, address, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out
