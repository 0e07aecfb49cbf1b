"""How fastdec.attention picks its launch on a GPU, checked on CPU (issue 21): no timing in the decode path (a
committed table per architecture and shape bucket, else the heuristic), fp32 follows torch's TF32 switch, head_dim
384 is not padded to 512, and Wan's strided q/k/v are read in place. The GPU side runs on compile_check's fake
GPUs (FakeTensorMode with an H100's or A100's properties): launches are recorded, nothing runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import needs_triton, record_kernel_launches, triton_devices
from tolerances import ATTENTION

from fastdec import ops
from fastdec.kernels import attention as attn
from fastdec.kernels.support import attention_config as config
from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compile_check", ROOT / "bench" / "compile_check.py")
compile_check = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
if not hasattr(compile_check, "fake_gpu"):
    _spec.loader.exec_module(compile_check)

needs_kernel = needs_triton("attention")
REFERENCE = attn.attention_reference  # kept before record_kernel_launches makes the module's copy raise
needs_triton_module = pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason=str(TRITON_IMPORT_ERROR))


@pytest.fixture
def gpu_launches(monkeypatch):
    """Runs attention_triton as on a GPU (not the interpreter's path) and makes any timing fail the test."""
    monkeypatch.setattr(attn, "triton_interpreting", lambda: False)

    def no_timing(*args, **kwargs):
        raise AssertionError("attention timed candidates in the decode path (triton.testing.do_bench)")

    monkeypatch.setattr(triton.testing, "do_bench", no_timing)

    def run(arch: int, q, k, v) -> list:
        with compile_check.recorded_launches(attn, arch) as launches:
            out = attn.attention_triton(q(), k(), v())
            assert out.shape == q().shape
        return [launch.kwargs for launch in launches if launch.kernel.__name__ == "_attention_forward_kernel"]

    return run


def fake(shape, dtype=torch.bfloat16):
    return lambda: torch.empty(shape, dtype=dtype, device="cuda")


@needs_triton_module
@pytest.mark.parametrize("arch", [90, 80])
def test_new_shapes_are_never_timed_and_use_the_heuristic(gpu_launches, arch):
    """Every Wan chunk length and slab height is a new shape: none may run do_bench (seconds each, device syncs,
    and a failure inside CUDA-graph capture). The SD mid-block at 512 px takes the first candidate that fits."""
    for tokens in (4096, 4000, 3000):
        (launch,) = gpu_launches(arch, fake((1, 1, tokens, 512)), fake((1, 1, tokens, 512)), fake((1, 1, tokens, 512)))
    expected = {90: (64, 32, 512, 8), 80: (64, 32, 512, 8)}[arch]  # q k^T in 64-wide chunks before Hopper
    assert (launch["BLOCK_M"], launch["BLOCK_N"], launch["D_MAIN"] + launch["D_TAIL"] if launch["DV_TAIL"]
            else launch["BLOCK_DV"], launch["num_warps"]) == expected


@needs_triton_module
def test_a_table_entry_wins_over_the_heuristic(gpu_launches, monkeypatch):
    key = config.bucket(torch.bfloat16, "tf32", 8, 1000, 1000, 64)
    monkeypatch.setitem(attn.TABLE, "sm_90", {key: {"tile": [64, 64, 512, 4, 3], "kv_splits": 1}})
    shape = (1, 8, 1000, 64)
    (launch,) = gpu_launches(90, fake(shape), fake(shape), fake(shape))
    assert (launch["BLOCK_M"], launch["BLOCK_N"], launch["num_warps"], launch["num_stages"]) == (64, 64, 4, 3)
    other = (1, 8, 5000, 64)  # another bucket: the heuristic's 128x64 tile
    (launch,) = gpu_launches(90, fake(other), fake(other), fake(other))
    assert (launch["BLOCK_M"], launch["BLOCK_N"]) == (128, 64)


@needs_triton_module
def test_a_plan_that_does_not_fit_falls_back_once(gpu_launches, monkeypatch):
    """A configuration whose resources the estimate got wrong: the next candidate, remembered for the bucket."""
    real = attn.launch_with_config
    refused = []

    def launch(q, k, v, scale, chosen, split_head_dim=True):
        if chosen.block_m == 128:
            refused.append(chosen)
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")
        return real(q, k, v, scale, chosen, split_head_dim)

    monkeypatch.setattr(attn, "launch_with_config", launch)
    monkeypatch.setattr(attn, "triton_interpreting", lambda: False)
    shape = (1, 4, 2048, 64)
    with compile_check.recorded_launches(attn, 90) as launches:
        for _ in range(2):
            attn.attention_triton(*(torch.empty(shape, dtype=torch.float16, device="cuda") for _ in range(3)))
    assert [launch.kwargs["BLOCK_M"] for launch in launches] == [64, 64]
    assert len(refused) == 2  # the 128-row candidates, each once: the second call goes straight to the third


@needs_triton_module
@pytest.mark.parametrize(("allow_tf32", "precision"), [(True, "tf32"), (False, "ieee")])
def test_fp32_follows_torchs_tf32_switch(gpu_launches, allow_tf32, precision):
    """As SDPA's fp32 math: TF32 tensor cores when torch allows TF32 matmuls, exact fp32 when it does not."""
    for shape, tf32_tile in (((1, 1, 4096, 512), (32, 16)), ((1, 8, 1024, 64), (64, 64))):
        with config.tf32(allow_tf32):
            (launch,) = gpu_launches(90, *(fake(shape, torch.float32) for _ in range(3)))
        assert launch["DOT_PRECISION"] == precision
        tile = (launch["BLOCK_M"], launch["BLOCK_N"])
        assert tile == (tf32_tile if allow_tf32 else (32, 32)), shape


def test_float32_matmul_precision_sets_the_switch():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert config.dot_precision(torch.float32, interpreting=False) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert config.dot_precision(torch.float32, interpreting=False) == "ieee"
        assert config.dot_precision(torch.float32, interpreting=True) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_head_dim_splits_only_where_it_pads_less():
    assert config.split_head_dim(384) == (256, 128)
    assert config.split_head_dim(96) == (64, 32)
    assert config.split_head_dim(80) == (64, 16)
    assert config.split_head_dim(512) == (512, 0)
    assert config.split_head_dim(448) == (512, 0)  # 256 + 256 pads as much as 512
    assert config.split_head_dim(8) == (16, 0)
    assert config.split_head_dim(24) == (32, 0)  # 16 + 16 is 32 too


@needs_triton_module
def test_wan_mid_block_runs_384_columns_in_place(gpu_launches, monkeypatch):
    """Wan's 384-wide head: 256 + 128 columns, whole D in one program, and its q/k/v (chunks of one conv output,
    head_dim stride H*W) are passed with their strides: no copy."""
    copies = []
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **kw: copies.append(self) or self)
    shape = (1, 1, 6240, 384)
    q, k, v = config.wan_qkv(shape, lambda s: torch.empty(s, dtype=torch.bfloat16, device="meta"))
    (launch,) = gpu_launches(90, *(lambda t=t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                                   for t in (q, k, v)))
    assert (launch["D_MAIN"], launch["D_TAIL"], launch["DV_TAIL"], launch["QK_CHUNK"]) == (256, 128, True, 256)
    assert copies == []


@needs_kernel
@pytest.mark.parametrize("device", triton_devices("attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("whole_d", [True, False])
def test_head_dim_384_in_wans_layout_matches_sdpa(device, dtype, whole_d, monkeypatch):
    """The tail columns (256..383) on both output paths: one program for all of D, and 256-wide D chunks (on CPU,
    the interpreter's config; on a GPU, whatever the dispatch chooses)."""
    launches = record_kernel_launches(monkeypatch, attn, {"forward": "_attention_forward_kernel"},
                                      "attention_reference")
    generator = torch.Generator().manual_seed(0)
    # 64 tokens: no key tail, so the split D runs on GPUs too (key_tail_unverified)
    q, k, v = config.wan_qkv((2, 1, 64, 384), lambda s: torch.randn(s, generator=generator).to(device, dtype))
    with config.tf32(False):  # fp32 on a GPU: the exact path, which ATTENTION's fp32 tolerance is for
        whole = attn.AttentionConfig(32, 32)
        out = attn.launch_with_config(q, k, v, None, whole) if whole_d else ops.attention(q, k, v)
    assert launches["forward"].launches == 1
    expected = REFERENCE(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), expected, **ATTENTION[dtype])


@needs_triton_module
def test_split_head_dim_with_a_key_tail_pads_d_on_gpus(gpu_launches):
    """The H200 finding (tests/test_attention_gpu_findings.py): a split D (96 = 64 + 32, 384 = 256 + 128) with q
    resident and a key tail launches D padded to one power of two (right there, where the split launch was wrong);
    without a key tail, and on fp32's chunked q k^T, the split launch."""
    def d_parts(q_shape, kv_shape, dtype=torch.bfloat16):
        (launch,) = gpu_launches(90, fake(q_shape, dtype), fake(kv_shape, dtype), fake(kv_shape, dtype))
        return launch["D_MAIN"], launch["D_TAIL"]

    assert d_parts((1, 2, 37, 96), (1, 2, 45, 96)) == (128, 0)
    assert d_parts((1, 1, 6244, 384), (1, 1, 6244, 384)) == (512, 0)
    assert d_parts((1, 1, 6240, 384), (1, 1, 6240, 384)) == (256, 128)
    assert d_parts((1, 2, 9216, 96), (1, 2, 9216, 96)) == (64, 32)
    assert d_parts((1, 2, 37, 128), (1, 2, 45, 128)) == (128, 0)
    with config.tf32(False):
        assert d_parts((1, 2, 37, 96), (1, 2, 45, 96), torch.float32) == (64, 32)


def test_the_tuning_command_writes_a_table_the_dispatch_reads(tmp_path):
    """bench/tune_attention.py (needs a GPU to time) writes kernels/support/attention_table.py's form; its TABLE reads
    back as written and keeps the module docstring."""
    spec = importlib.util.spec_from_file_location("tune_attention", ROOT / "bench" / "tune_attention.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    table = {"sm_90": {config.bucket(torch.bfloat16, "tf32", 1, 6240, 6240, 384): {
        "tile": [64, 32, 512, 8, 2], "kv_splits": 2, "us": 812.5, "gpu": "NVIDIA H200", "date": "2026-12-04"}}}
    path = tmp_path / "_attention_table.py"
    path.write_text(tune.render(table))
    assert tune.read_table(path) == table
    assert path.read_text().startswith('"""Attention launch configurations timed on real GPUs')
    expected = attn.AttentionConfig(64, 32, 512, 2, 8, 2)
    assert config.table_config(table, (9, 0), "bf16 d384 bh1 q8192 kv8192") == expected
    assert tune.read_table(tune.TABLE_FILE) == attn.TABLE
