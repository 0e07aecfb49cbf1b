"""The op registry: every op is registered, checked by opcheck, compiles without graph breaks, and degrades
gracefully when triton or the extension is missing (packaging: test_packaging.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import compile_fullgraph, run_python

from fastdec import ops


def sample_calls() -> dict[str, list[tuple]]:
    """Small argument tuples per op, covering layouts and optional arguments."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    cl = r(1, 8, 5, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    return {
        "group_norm_act": [
            (r(2, 8, 5, 3, grad=True), 4, r(8, grad=True), r(8, grad=True), 1e-6, "silu"),
            (cl, 2, None, None, 1e-5, "relu"),
            (r(1, 6, 2, 3, 4, grad=True), 3, r(6), r(6), 1e-6, "none"),
        ],
        "rms_norm_act": [
            (r(2, 8, 5, 3, grad=True), r(8, grad=True), r(8, grad=True), 1e-5, "none", "add"),
            (cl, r(8), None, 1e-6, "silu", "clamp"),
            (r(1, 6, 2, 3, 4, grad=True), None, None, 1e-6, "relu", "add"),
        ],
        "attention": [
            (r(1, 2, 7, 16, grad=True), r(1, 2, 5, 16, grad=True), r(1, 2, 5, 16, grad=True), None),
            (r(2, 1, 9, 32), r(2, 1, 9, 32), r(2, 1, 9, 32), 0.3),
        ],
        "patch_unembed": [
            (r(2, 6, 2 * 2 * 3, grad=True), 2, 2, 3, r(12, grad=True), "identity", None),
            (r(1, 4, 4 * 4 * 1), 4, 2, 2, None, "to_unit", torch.float16),
        ],
        "pixel_shuffle": [
            (r(1, 8, 3, 4, grad=True), 2, 0),
            (r(1, 8, 3, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True), 2, 1),
        ],
    }


def registered_ops() -> set[str]:
    namespace = torch.ops.fastdec
    return {name for name in dir(namespace) if isinstance(getattr(namespace, name, None), torch._ops.OpOverloadPacket)}


def test_every_registered_op_has_samples_and_a_backend():
    assert registered_ops() == set(sample_calls()) == set(ops.backends())


@pytest.mark.parametrize(("name", "index"), [(n, i) for n, calls in sample_calls().items() for i in range(len(calls))])
def test_opcheck(name, index):
    args = sample_calls()[name][index]
    torch.library.opcheck(getattr(torch.ops.fastdec, name).default, args)


class EveryOp(torch.nn.Module):
    def forward(self, x, q, tokens):
        y = ops.group_norm_act(x, 4, None, None, 1e-6, "silu")
        y = ops.rms_norm_act(y, None, None, 1e-6, "silu", "clamp")
        y = ops.pixel_shuffle(y, 2) + ops.pixel_shuffle(torch.nn.functional.pad(y, (0, 1, 0, 1)), 2, 1)
        a = ops.attention(q, q, q)
        img = ops.patch_unembed(tokens, 2, 2, 2, None, "to_unit", None)
        return y.sum() + a.sum() + img.sum()


def test_fullgraph_compile_without_graph_breaks():
    args = (torch.randn(1, 16, 4, 4), torch.randn(1, 1, 8, 16), torch.randn(1, 4, 12))
    torch.testing.assert_close(*compile_fullgraph(EveryOp(), *args))


def test_backends_report_the_interpreter_when_requested():
    table = ops.backends()
    expect = "triton (interpreter)" if os.environ.get("FASTDEC_TRITON_INTERPRET") == "1" else "eager reference"
    for name in ops.TRITON_OPS:
        assert table[name]["cpu"].startswith(expect)
    assert table["pixel_shuffle"]["cpu"] == "C++ (fastdec._C)"
    assert "| `pixel_shuffle` |" in ops.format_backends()


CHECK_FALLBACK = """
import sys, json
{block}
import torch, fastdec
x = torch.randn(1, 8, 3, 3)
y = fastdec.ops.group_norm_act(x, 4, None, None, 1e-6, "silu")
torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, eps=1e-6)))
assert torch.equal(fastdec.ops.pixel_shuffle(x, 2), torch.nn.functional.pixel_shuffle(x, 2))
print(json.dumps(fastdec.ops.backends()))
"""


def test_import_without_triton_falls_back_and_says_why():
    out = run_python(CHECK_FALLBACK.format(block="sys.modules['triton'] = None  # as if not installed"))
    table = json.loads(out)
    for name in ops.TRITON_OPS:
        assert table[name]["cpu"].startswith("eager reference: triton not installed")
        assert table[name]["cuda"].startswith("eager reference: triton not installed")


def test_import_without_extension_falls_back_and_says_why():
    out = run_python(CHECK_FALLBACK.format(block="sys.modules['fastdec._C'] = None  # as if not built"))
    table = json.loads(out)
    assert table["pixel_shuffle"]["cpu"].startswith("eager reference: fastdec._C not built")


def test_core_works_without_optional_packages():
    """diffusers, huggingface_hub, matplotlib, rich and timm are extras: import, load a preset and decode without."""
    out = run_python(
        "import sys\n"
        "for name in ('diffusers', 'huggingface_hub', 'matplotlib', 'rich', 'timm'):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "import warnings, torch, fastdec, fastdec.cli\n"
        "warnings.simplefilter('ignore')\n"
        "print(tuple(fastdec.decode(torch.randn(4, 8, 8), decoder=fastdec.load('tae-192')).shape))\n"
    )
    assert out.strip() == "(3, 64, 64)"
