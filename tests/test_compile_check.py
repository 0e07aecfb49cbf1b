"""bench/compile_check.py: the Triton kernels compile for Hopper (sm_90a) at the configurations their launchers use
on a GPU. CI has no GPU and the interpreter compiles nothing, so this is where tl.dot shape rules, register or
shared-memory overflow and GPU-only constexpr branches fail first. The compiles run in a child process without
TRITON_INTERPRET (check() removes it), so the suite's interpreter variables do not matter here."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compile_check", ROOT / "bench" / "compile_check.py")
compile_check = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(compile_check)
Result = compile_check.Result

LAUNCHED_KERNELS = {
    "_group_norm_stats_kernel", "_group_norm_combine_kernel", "_group_norm_act_kernel",
    "_attention_forward_kernel", "_combine_splits_kernel", "_patch_unembed_kernel", "_rms_norm_act_kernel",
}  # fmt: skip


@pytest.fixture(scope="module")
def quick_report() -> dict:
    reason = compile_check.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot compile Triton kernels for CUDA here: {reason}")
    return compile_check.check([90], quick=True, timeout=600)


def test_quick_subset_compiles_for_sm90_within_the_spill_limit(quick_report):
    found = compile_check.problems(quick_report, compile_check.DEFAULT_MAX_SPILL)
    assert found == [], "\n".join(found)
    results = quick_report["results"]
    assert {r.kernel for r in results} == LAUNCHED_KERNELS
    for r in results:
        assert r.ok and r.error == "", r
        assert r.arch == 90 and 0 < r.registers <= 255, r
        assert r.spill <= compile_check.DEFAULT_MAX_SPILL and r.fits, r
        assert r.shared is not None


def test_quick_subset_covers_both_group_norm_paths_and_the_attention_split(quick_report):
    kernels_per_config = {
        op: sorted(sorted(quick_report["results"][i].kernel for i in config["results"])
                   for config in quick_report["configs"] if config["op"] == op)
        for op in ("group_norm_act", "attention")
    }  # fmt: skip
    split_path = ["_group_norm_act_kernel", "_group_norm_combine_kernel", "_group_norm_stats_kernel"]
    assert split_path in kernels_per_config["group_norm_act"]
    assert ["_group_norm_act_kernel"] in kernels_per_config["group_norm_act"]  # single-program path
    assert ["_attention_forward_kernel", "_combine_splits_kernel"] in kernels_per_config["attention"]


def test_fp16_bf16_attention_uses_wgmma_on_hopper(quick_report):
    forward = [r for r in quick_report["results"] if r.kernel == "_attention_forward_kernel"]
    tensor_core = [r for r in forward if not r.case.startswith("fp32")]
    assert tensor_core and all(r.wgmma > 0 for r in tensor_core), [(r.case, r.params, r.wgmma) for r in forward]


def test_launchers_ran_their_gpu_path(quick_report):
    """Tile sizes are the GPU's (the interpreter's are 16x larger) and grids follow the H100's 132 SMs."""
    params = {(r.kernel, r.case): r.params for r in quick_report["results"]}
    # channels_last: whole 16-channel groups, 32 groups per tile, 4 positions: 2048 lanes
    assert params["_group_norm_stats_kernel", "bf16 channels_last 1x512x64x64 silu"] == "G=32 CG=16 S=4 w4"
    assert params["_group_norm_act_kernel", "fp32 NCHW 1x192x32x32 silu"] == "G=1 CG=4 S=512 w4"
    assert params["_patch_unembed_kernel", "bf16 -> u8 to_unit p=16 32x32"] == "PATCH=16 C=4 PIX=1024 w8"
    # Hopper keeps q whole for q k^T (QK_CHUNK = D); 4096 / 64 = 64 query blocks < 132 SMs: a 2-way key split
    # (issue 21: the dispatch chooses one config, no longer the tuner's candidates with and without the split)
    forward = [r.params for r in quick_report["results"]
               if r.kernel == "_attention_forward_kernel" and r.case == "bf16 1x1x4096x512"]
    assert forward == [
        "HEAD_DIM=512 M=64 N=32 D_MAIN=512 D_TAIL=0 DV=512 QK_CHUNK=512 DV_CHUNKS=1 SPLITS=2 w8 s2",
    ]


def test_specialize_follows_triton_launch_rules():
    assert compile_check.specialize(1) == ("constexpr", False)
    assert compile_check.specialize(None) == ("constexpr", False)
    assert compile_check.specialize(0) == ("i32", True)
    assert compile_check.specialize(48) == ("i32", True)
    assert compile_check.specialize(7) == ("i32", False)
    assert compile_check.specialize(2**31) == ("i64", True)
    assert compile_check.specialize(-(2**31)) == ("i32", True)
    assert compile_check.specialize(1e-6) == ("fp32", False)
    assert compile_check.specialize(torch.empty(2, dtype=torch.uint8)) == ("*u8", True)
    with pytest.raises(ValueError, match="no triton signature type"):
        compile_check.specialize("silu")


def _result(kernel: str, case: str, **fields) -> Result:
    defaults = dict(ok=True, registers=128, spill_stores=0, spill_loads=0, shared=1024, fits=True)
    return Result(kernel, 90, case, "M=64", **{**defaults, **fields})


def test_problems_flags_what_would_fail_on_the_gpu():
    every_kernel = [_result(name, "covered") for name in sorted(LAUNCHED_KERNELS)]
    compile_error = "CompilationError: at 3:4:\n  tl.dot(a, b)\n  ^\nshape mismatch"  # the source sits in between
    results = every_kernel + [
        _result("_attention_forward_kernel", "tuned ok", spill_loads=300),  # fits, spills: flagged
        _result("_attention_forward_kernel", "tuned ok", fits=False, shared=300_000),  # skipped by the tuner
        _result("_attention_forward_kernel", "tuned too big", fits=False, shared=300_000),
        _result("_group_norm_act_kernel", "untuned", fits=False, shared=300_000),
        _result("_patch_unembed_kernel", "broken", ok=False, error=compile_error),
    ]
    n = len(every_kernel)
    configs = [{"arch": 90, "op": "x", "case": "covered", "tuned": False, "results": list(range(n))},
               {"arch": 90, "op": "attention", "case": "tuned ok", "tuned": True, "results": [0, n]},
               {"arch": 90, "op": "attention", "case": "tuned ok", "tuned": True, "results": [n + 1]},
               {"arch": 90, "op": "attention", "case": "tuned too big", "tuned": True, "results": [n + 2]},
               {"arch": 90, "op": "group_norm_act", "case": "untuned", "tuned": False, "results": [n + 3]},
               {"arch": 90, "op": "patch_unembed", "case": "broken", "tuned": False, "results": [n + 4]}]
    found = compile_check.problems({"results": results, "configs": configs}, max_spill=256)
    assert found == [
        "_patch_unembed_kernel sm_90 broken M=64: CompilationError: at 3:4: ... shape mismatch",
        "_attention_forward_kernel sm_90 tuned ok M=64: spills 300 bytes (> 256) "
        "(tuner candidate; 0 of 2 configs of the case are usable)",
        "sm_90 tuned too big: no tuner candidate fits 232448 bytes of shared memory",
        "_group_norm_act_kernel sm_90 untuned: needs 300000 bytes of shared memory",
    ]
    assert compile_check.problems({"results": every_kernel, "configs": configs[:1]}, max_spill=256) == []


def test_problems_flags_a_kernel_no_launcher_launched():
    if compile_check.TRITON_IMPORT_ERROR is not None:
        pytest.skip(compile_check.TRITON_IMPORT_ERROR)  # without triton there are no kernels to find
    found = {name for module in compile_check.KERNEL_MODULES for name in compile_check.launched_kernels(module)}
    assert found == LAUNCHED_KERNELS
    every_kernel_but_one = [_result(name, "covered") for name in sorted(LAUNCHED_KERNELS)[1:]]
    missing = compile_check.problems({"results": every_kernel_but_one, "configs": []}, max_spill=256)
    assert missing == [f"{sorted(LAUNCHED_KERNELS)[0]} was never launched by its launcher"]


def test_table_lists_every_result_with_its_failure():
    results = [_result("_patch_unembed_kernel", "bf16", wgmma=0, mma_sync=0),
               _result("_attention_forward_kernel", "fp16", ok=False, error="OutOfResources: shared memory")]
    table = compile_check.format_table({"results": results}).splitlines()
    assert table[0].split()[:3] == ["kernel", "arch", "case"] and set(table[1]) == {"-"}
    assert table[2].split() == ["_patch_unembed_kernel", "sm_90", "bf16", "M=64", "128", "0/0", "1.0", "-", "0.0s"]
    assert "FAILED" in table[3] and "OutOfResources: shared memory" in table[3]
    assert dataclasses.asdict(results[0])["kernel"] == "_patch_unembed_kernel"


# --- the committed report (issue 21 item 2): every plan the dispatch can choose, compiled for sm_90 and sm_80 -------

REPORTS = sorted((ROOT / "bench" / "results").glob("*-compile-check-sm90-sm80.json"))
REGENERATE = ("python bench/compile_check.py --arch 90,80 --save bench/results/<date>-compile-check-sm90-sm80 "
              "(OMP_NUM_THREADS=1; about 15 minutes on 2 cores)")


@pytest.fixture(scope="module")
def committed() -> dict:
    assert REPORTS, f"no committed compile report; {REGENERATE}"
    return compile_check.read_saved(REPORTS[-1])


def test_committed_plans_compile_fit_the_gpu_and_do_not_spill(committed):
    """Every kernel launch the dispatch chooses compiled for sm_90 (H100/H200: 255 registers, 227 KiB of shared
    memory per block) and sm_80 without spilling; the other attention candidates (what bench/tune_attention.py may
    write into the table) within the spill limit, and one of each case fits."""
    assert committed["problems"] == []
    assert compile_check.problems(committed, committed["meta"]["max_spill"]) == []
    chosen = {i for config in committed["configs"] if not config["tuned"] for i in config["results"]}
    assert {r.arch for r in committed["results"]} == {90, 80}
    for i, r in enumerate(committed["results"]):
        assert r.ok and 0 < r.registers <= 255, r
        if i in chosen:
            assert r.spill == 0, f"{r.kernel} sm_{r.arch} {r.case} {r.params} spills {r.spill} bytes"
            assert r.fits and r.shared <= compile_check.GPUS[r.arch].shared_memory, r


def test_committed_report_covers_every_family_decode_plan(committed):
    """The report names every family's decode shapes (issue 21: SD/SDXL, FLUX, Wan 2.1 480p/720p, SVD, DC-AE)."""
    cases = {config["case"] for config in committed["configs"]}
    for needle in ("1x1x4096x512", "1x1x16384x512", "1x1x6240x384", "1x1x14400x384", "14x1x9216x512",
                   "1x96x4x720x1280", "1x128x2048x2048", "per_frame", "fp32-tf32", "fp32-ieee"):
        assert any(needle in case for case in cases), needle


def test_committed_report_holds_whole_decodes_of_every_family(committed):
    """Issue 21 item 2: every launch of a whole decode of each family at its real sizes (recorded on the fake GPU,
    channels_last too where the family runs so) is in the report, not only the op files' own cases."""
    cases = {config["case"] for config in committed["configs"] if config["op"] == "decode"}
    for name, size, dtype, tile in compile_check.DECODES:
        assert compile_check.decode_case(name, size, dtype, "NCHW", tile) in cases, (name, size)
    assert "decode sd-vae 1024x1024 bf16 channels_last" in cases and "decode wan2.1 21x90x160 bf16 NCHW" in cases
    assert "decode sd-vae 4096x4096 bf16 channels_last tiled 384" in cases


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # UpsampleConv's weight-cache key
def test_decode_launches_take_the_row_chunks_a_gpu_takes():
    """An SD-VAE 1024^2 bf16 decode on a (fake) GPU normalizes its largest tensors in row chunks (models.layers
    CHUNKED_BYTES), which layers leave to whole tensors under FakeTensorMode: the fake GPU lets them chunk, so the
    chunks' launch plans are the ones compiled."""
    from fastdec.bench.decoders import ENTRIES

    launches, _ = compile_check.decode_launches(ENTRIES["sd-vae"], 1024, "bf16", False, 90)
    shapes = {tuple(arg.shape) for launch in launches if launch.kernel.__name__ == "_group_norm_act_kernel"
              for arg in launch.args[:1] if isinstance(arg, torch.Tensor)}
    assert any(len(shape) == 4 and shape[-2] < shape[-1] for shape in shapes), shapes  # rows of a square image


def test_committed_report_is_not_stale(committed):
    """The launches the dispatch makes today (recorded on fake GPUs, nothing compiled) are all in the report: a
    change of a kernel, a tile table or the attention table fails here until the report is regenerated."""
    reason = compile_check.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot record Triton launches for CUDA here: {reason}")
    if committed["meta"]["triton"] != compile_check.triton.__version__:  # launch keys are triton's reprs
        pytest.skip(f"the report is of triton {committed['meta']['triton']}, this is {compile_check.triton.__version__}"
                    f"; {REGENERATE}")
    plans = compile_check.check([90, 80], quick=False, plans_only=True, timeout=900)
    known = {r.key for r in committed["results"]}
    missing = [f"{r.kernel} sm_{r.arch} {r.case} {r.params}" for r in plans["results"] if r.key not in known]
    assert missing == [], f"{len(missing)} launch plans are not in {REPORTS[-1].name}; {REGENERATE}:\n" + \
        "\n".join(missing[:20])


@pytest.mark.slow
def test_regenerated_report_has_no_problems():
    reason = compile_check.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot compile Triton kernels for CUDA here: {reason}")
    report = compile_check.check([90, 80], quick=False, timeout=3600)
    assert compile_check.problems(report, compile_check.DEFAULT_MAX_SPILL) == []


def test_channels_last_group_norm_leaves_room_for_occupancy(committed):
    """Issue 21 risk 5: the channels_last normalize kernel took 150-168 registers per thread at 4 warps; at 8 warps
    each thread holds half the tile."""
    found = [(r.case, r.registers) for r in committed["results"]
             if r.kernel == "_group_norm_act_kernel" and "channels_last" in r.case]
    assert found and all(registers <= 128 for _, registers in found), found


def test_committed_extension_report_has_no_spills_and_matches_the_sources():
    """fastdec._C's CUDA kernels (pixel_shuffle, the vectorised channels_last path included) through ptxas for
    sm_90 and sm_80 (bench/ptxas_extension.sh): no spills, and the report is of today's csrc/."""
    import hashlib
    import re

    reports = sorted((ROOT / "bench" / "results").glob("*-ptxas-extension-sm90-sm80.txt"))
    assert reports, "no committed extension report; run bench/ptxas_extension.sh bench/results/<date>-ptxas-..."
    text = reports[-1].read_text()
    sources = sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "csrc").glob("*.h"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    stale = f"csrc/ changed since {reports[-1].name}: rerun bench/ptxas_extension.sh"
    assert f"# sources sha256: {digest}" in text, stale
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
    assert len(entries) == len(spills) == len(registers) > 0
    assert {arch for _, arch in entries} == {"sm_90", "sm_80"}
    assert any("shuffle_channels_last" in name for name, _ in entries)
    assert all(stores == loads == "0" for stores, loads in spills) and max(registers) <= 255


class LargeCopies(TorchDispatchMode):
    """Records the copies (clone, copy_, to) of tensors over 2^16 elements made inside a launcher: an input or
    output the kernel could not read or write in place (issue 21 risk 3: Wan's per-frame views were copied)."""

    def __init__(self, launcher: str, found: list):
        super().__init__()
        self.launcher, self.found = launcher, found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        copies = (torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)
        if func in copies and args[0].numel() > 2**16:
            self.found.append((self.launcher, str(func), tuple(args[0].shape), args[0].stride()))
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # UpsampleConv's weight-cache key
def test_no_launcher_copies_a_tensor_in_a_whole_decode(monkeypatch):
    """Every DECODES decode on the fake GPU (each family at its real sizes, NCHW and channels_last, untiled and
    tiled): the launchers read and write every layout the models hand them in place."""
    from fastdec.bench.decoders import ENTRIES

    found: list = []

    def watched(name, launcher):
        def run(*args, **kwargs):
            with LargeCopies(name, found):
                return launcher(*args, **kwargs)
        return run

    for module in compile_check.KERNEL_MODULES:
        for name in [name for name in vars(module) if name.endswith("_triton")]:
            monkeypatch.setattr(module, name, watched(name, getattr(module, name)))
    for (name, size, dtype, tile), channels_last in itertools.product(compile_check.DECODES, (False, True)):
        recorded = compile_check.decode_launches(ENTRIES[name], size, dtype, channels_last, 90, tile)
        assert recorded is None or recorded[0], (name, size)  # launched something
        assert found == [], (name, size, dtype, channels_last, tile, found[:4])
