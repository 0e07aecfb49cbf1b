"""Compile every fastdec Triton kernel ahead of time for Hopper (sm_90a) and Ampere (sm_80), without a GPU, and
report registers, spills, shared memory and (Hopper attention) wgmma use per kernel configuration.

    python bench/compile_check.py [--arch 90,80] [--quick] [--max-spill 256] [--json]

Why: CI has no GPU, and triton's CPU interpreter, which the tests use, never compiles a kernel, so GPU-only
errors (tl.dot shape/dtype rules, register or shared-memory overflow, constexpr branches the interpreter never
takes) would first show up on a GPU. Here each launcher runs for real at decoder shapes on fake CUDA tensors
(torch's FakeTensorMode, with the device's SM count and compute capability patched in), its kernel launches are
recorded instead of run, and every recorded launch is compiled with ``triton.compile`` for the target with the
signature triton would specialize at launch (pointers 16-byte aligned as torch allocates them, ints equal to 1 as
constants, ints divisible by 16 marked so). So the constexprs, tile sizes, warps and stages are exactly the
launchers' own, including the attention tuner's whole candidate table and its key splits. ptxas's own report
(triton's run of it, ``TRITON_DUMP_PTXAS_LOG``) gives registers and spills; the shared memory is triton's.

Exit status 1 when a kernel fails to compile, spills more than --max-spill bytes, needs more shared memory than the
GPU has (for the tuned attention kernel: when no candidate of a shape fits), or a kernel is never launched. The
compiles run in a child process without TRITON_INTERPRET (the interpreter replaces the kernels and their tile sizes),
with an empty triton cache so that ptxas runs and reports for every kernel. Without triton, its CUDA backend or
ptxas the script prints why and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastdec import ops
from fastdec.bench.fake_gpu import GPUS, Launch, decode_launches, fake_gpu, launched_kernels, recorded_launches
from fastdec.kernels.support.cases import shape_label
from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton, triton_interpreting

# Each op file's compile_cases(quick): launcher calls at decoder shapes (kernels/<op>.py, "the calls its checks make").
KERNEL_MODULES = tuple(module for module in ops.OP_MODULES.values() if hasattr(module, "compile_cases"))
DEFAULT_MAX_SPILL = 256  # bytes of spill stores or loads per thread
_POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                  torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
_DIVISIBILITY = [["tt.divisibility", 16]]


@dataclasses.dataclass
class Config:
    """One launcher call: its kernel launches must all compile, fit and not spill. In a tuned case the tuner
    skips configs that do not fit the GPU, so there one config of the case suffices."""

    case: str
    launches: list[Launch]
    tuned: bool = False


# Whole decodes (bench entry, image side or latent shape, dtype, slab rows when tiled) whose every launch the report
# must hold: the families at the sizes of issue 21 in bf16; SD/SDXL 1024^2 also in fp16 and fp32 (pipelines that
# keep force_upcast); SD-VAE 4096^2 untiled (tensors past 2^31 elements index in int64) and in the tiling bench's
# slabs of 384 rows (diffusers' 512 px tile less its blend).
DECODES = [("sd-vae", 512, "bf16", None), ("sd-vae", 1024, "bf16", None), ("sd-vae", 1024, "fp16", None),
           ("sd-vae", 1024, "fp32", None), ("sd-vae", 4096, "bf16", None), ("sd-vae", 4096, "bf16", 384),
           ("flux1", 1024, "bf16", None), ("flux2", 1024, "bf16", None), ("dc-ae", 1024, "bf16", None),
           ("dc-ae", 2048, "bf16", None), ("wan2.1", (1, 16, 21, 60, 104), "bf16", None),
           ("wan2.1", (1, 16, 21, 90, 160), "bf16", None), ("svd", (1, 4, 14, 72, 128), "bf16", None),
           ("efficientvit-attn", 512, "bf16", None), ("vit-s", 512, "bf16", None)]


def decode_case(name: str, size, dtype: str, layout: str, tile: int | None) -> str:
    """A DECODES decode's case label in the report, e.g. "decode wan2.1 21x60x104 bf16 NCHW"."""
    label = shape_label(size[2:]) if isinstance(size, tuple) else f"{size}x{size}"
    return f"decode {name} {label} {dtype} {layout}" + (f" tiled {tile}" if tile else "")


def decode_configs(arch: int) -> list[Config]:
    """The launches of each DECODES decode on the fake GPU, in NCHW and, for the families that run channels_last
    on a GPU (``channels_last_on_cuda``), in channels_last."""
    from fastdec.bench.decoders import ENTRIES

    configs = []
    for (name, size, dtype, tile), layout in itertools.product(DECODES, ("NCHW", "channels_last")):
        recorded = decode_launches(ENTRIES[name], size, dtype, layout == "channels_last", arch, tile)
        if recorded is not None:
            configs.append(Config(decode_case(name, size, dtype, layout, tile), recorded[0]))
    return configs


def op_configs(module, arch: int, quick: bool) -> list[Config]:
    """The recorded launches of each of the op file's compile cases (listed on the fake GPU: attention's tuner
    candidates depend on it)."""
    with fake_gpu(arch):
        cases = module.compile_cases(quick)
    configs = []
    for case in cases:
        with recorded_launches(module, arch) as launches:
            case.run()
        configs.append(Config(case.label, launches, case.tuned))
    return configs


# --- compiling one launch ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One distinct compile (identical launches of several configs are compiled once)."""

    kernel: str
    arch: int
    case: str  # the first config that launched it
    params: str  # tile constexprs and launch options
    ok: bool = False
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None  # bytes
    fits: bool | None = None  # shared memory within the GPU's limit
    wgmma: int | None = None  # wgmma.mma_async instructions in the PTX (sm_90)
    mma_sync: int | None = None
    seconds: float = 0.0
    key: str = ""  # what identifies the compile, see compile_all (a committed report is checked against the plans)

    @property
    def spill(self) -> int:
        return max(self.spill_stores or 0, self.spill_loads or 0)

    @property
    def summary(self) -> str:
        """The error in one line: its first and last lines (triton's CompilationError puts the source between)."""
        lines = [line.strip() for line in self.error.splitlines() if line.strip()] or ["failed"]
        return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def specialize(value) -> tuple[str, bool]:
    """(signature type, divisible by 16) of a runtime argument, as triton specializes it at launch: tensors are
    pointers (torch allocations are aligned), an int equal to 1 becomes a constant, floats are fp32."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype], True
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
        return "constexpr", False
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        kind = "i32" if -(2**31) <= value < 2**31 else "i64" if -(2**63) <= value < 2**63 else "u64"
        return kind, value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise ValueError(f"compile_check: no triton signature type for a {type(value).__name__} kernel argument")


def compile_job(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for ASTSource and triton.compile, from a recorded launch."""
    fn = launch.kernel
    bound = fn.signature.bind(*launch.args, **{k: v for k, v in launch.kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in launch.kwargs.items() if k not in fn.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        value = bound.arguments[name]
        kind, divisible = ("constexpr", False) if param.is_constexpr else specialize(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = value
        elif divisible:
            attrs[(index,)] = _DIVISIBILITY
    return signature, constexprs, attrs, options


def _params_label(launch: Launch, options: dict) -> str:
    """The launch's int constexprs (tile sizes, BLOCK_ and NUM_ dropped) and options: 'M=64 N=32 SPLITS=2 w8 s2'."""
    tiles = [f"{k.removeprefix('BLOCK_').removeprefix('NUM_')}={v}" for k, v in launch.kwargs.items()
             if k in launch.kernel.arg_names and isinstance(v, int) and not isinstance(v, bool)]
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(tiles + [f"{short.get(k, k + '=')}{v}" for k, v in options.items()])


def find_ptxas() -> str | None:
    candidates = [os.environ.get("TRITON_PTXAS_PATH"), str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")]
    found = [path for path in candidates if path and os.access(path, os.X_OK)]
    return found[0] if found else shutil.which("ptxas")


def _ptxas_report(log: str, ptx: str, arch: int) -> str:
    """ptxas -v output: triton's own run when it logged one (TRITON_DUMP_PTXAS_LOG), else a run of ours."""
    if re.search(r"Used \d+ registers", log):
        return log
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([find_ptxas(), "-v", f"--gpu-name={gpu_name}", str(source), "-o", os.devnull],
                              capture_output=True, text=True)
    return done.stdout + done.stderr


def compile_launch(launch: Launch, arch: int, result: Result) -> Result:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = compile_job(launch)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # triton prints ptxas's log (and PTX dumps on failure) to stdout
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # noqa: BLE001 - any compile error is the finding
        result.error = f"{type(error).__name__}: {error}".strip()
        result.seconds = time.perf_counter() - start
        return result
    ptx = compiled.asm["ptx"]
    report = _ptxas_report(log.getvalue(), ptx, arch)
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    result.ok = registers is not None
    result.error = "" if result.ok else "ptxas -v reported no register count:\n" + report
    result.registers = int(registers.group(1)) if registers else None
    result.spill_stores, result.spill_loads = map(int, spills.groups()) if spills else (None, None)
    result.shared = compiled.metadata.shared
    result.fits = result.shared <= GPUS[arch].shared_memory
    result.wgmma, result.mma_sync = ptx.count("wgmma.mma_async"), ptx.count("mma.sync")
    result.seconds = time.perf_counter() - start
    return result


# --- the check --------------------------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why kernels cannot be compiled here, or None."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        return f"triton {triton.__version__} lacks ASTSource/GPUTarget ({error})"
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return f"triton {triton.__version__} has no CUDA backend"
    if find_ptxas() is None:
        return "no ptxas (neither triton's bundled one, TRITON_PTXAS_PATH nor one on PATH)"
    return None


def compile_all(archs: list[int], quick: bool, compile_: bool) -> dict:
    """Records every config's launches and compiles each distinct launch once per arch (this process must not run
    the interpreter). Returns {"results": [Result as dict], "configs": [{arch, case, tuned, results: [index]}]}.
    compile_=False: the plans only (each result's kernel, case, params and key; nothing compiled)."""
    kernels = [kernel for module in KERNEL_MODULES for kernel in launched_kernels(module).values()]
    if triton_interpreting() or not all(isinstance(kernel, triton.runtime.JITFunction) for kernel in kernels):
        raise RuntimeError("compile_check: the kernels are interpreted in this process; use check(), which compiles "
                           "in a child process without TRITON_INTERPRET")
    results: list[Result] = []
    index: dict[str, int] = {}
    configs = []
    ops_and_decodes = [(module.__name__.rpartition(".")[2], functools.partial(op_configs, module, quick=quick))
                       for module in KERNEL_MODULES] + ([] if quick else [("decode", decode_configs)])
    for arch, (op, configs_of) in itertools.product(archs, ops_and_decodes):
        for config in configs_of(arch):
            used = []
            for launch in config.launches:
                job = compile_job(launch)  # signature, constexprs, attrs, options: with the arch, what one compile is
                key = repr((arch, launch.kernel.__name__, *job))
                if key not in index:
                    result = Result(launch.kernel.__name__, arch, config.case, _params_label(launch, job[3]), key=key)
                    index[key] = len(results)
                    results.append(compile_launch(launch, arch, result) if compile_ else result)
                    status = f"{result.seconds:.1f}s" if result.ok else "FAILED"
                    print(f"[{len(results)}] {result.kernel} sm_{arch} {config.case}: {status}", file=sys.stderr,
                          flush=True)
                used.append(index[key])
            configs.append({"arch": arch, "op": op, "case": config.case, "tuned": config.tuned, "results": used})
    return {"results": [dataclasses.asdict(r) for r in results], "configs": configs}


def check(archs: list[int], quick: bool, *, progress: bool = False, timeout: float | None = None,
          plans_only: bool = False) -> dict:
    """compile_all in a child process without the interpreter's variables and with an empty triton cache (so
    ptxas runs and reports every kernel). progress: stream one line per compile to stderr. plans_only: record the
    launches the dispatch makes, compile nothing (seconds, not minutes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDEC_TRITON_INTERPRET")}
    with tempfile.TemporaryDirectory() as folder:
        env.update(TRITON_CACHE_DIR=folder, TRITON_DUMP_PTXAS_LOG="1")
        report_file = Path(folder) / "report.json"
        command = [sys.executable, __file__, "--arch", ",".join(map(str, archs)), "--child", str(report_file)]
        command += (["--quick"] if quick else []) + (["--plans-only"] if plans_only else [])
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE,
                              stderr=None if progress else subprocess.STDOUT, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"compile_check: the compiling process failed ({done.returncode}):\n"
                               f"{done.stdout[-5000:]}")
        return read_saved(report_file)


def problems(report: dict, max_spill: int) -> list[str]:
    """Everything that would fail or misbehave on the GPU: compile errors, spills over max_spill, shared memory over
    the limit (in a tuned case only when no config fits: the tuner skips the others), kernels never launched."""
    results: list[Result] = report["results"]
    found = [f"{r.kernel} sm_{r.arch} {r.case} {r.params}: {r.summary}" for r in results if not r.ok]
    cases: dict[tuple, list[list[Result]]] = {}
    for config in report["configs"]:
        runs = cases.setdefault((config["arch"], config["case"], config["tuned"]), [])
        runs.append([results[i] for i in config["results"]])
    for (arch, case, tuned), runs in cases.items():
        usable = sum(all(r.ok and r.fits and r.spill <= max_spill for r in run) for run in runs)
        note = f" (tuner candidate; {usable} of {len(runs)} configs of the case are usable)" if tuned else ""
        for r in (r for run in runs for r in run if r.ok):
            if r.fits and r.spill > max_spill:
                found.append(f"{r.kernel} sm_{arch} {case} {r.params}: spills {r.spill} bytes (> {max_spill}){note}")
            elif not r.fits and not tuned:
                found.append(f"{r.kernel} sm_{arch} {case}: needs {r.shared} bytes of shared memory")
        if tuned and not any(all(r.ok and r.fits for r in run) for run in runs):
            found.append(f"sm_{arch} {case}: no tuner candidate fits {GPUS[arch].shared_memory} bytes of shared memory")
    launched = {r.kernel for r in results}
    found += [f"{name} was never launched by its launcher" for module in KERNEL_MODULES
              for name in launched_kernels(module) if name not in launched]
    return list(dict.fromkeys(found))  # a kernel shared by several configs of a case is reported once


_COLUMNS = ("kernel", "arch", "case", "constexprs / options", "regs", "spill st/ld", "smem KiB", "mma", "time")


def _cells(r: Result) -> tuple[str, ...]:
    if not r.ok:
        return r.kernel, f"sm_{r.arch}", r.case, r.params, "FAILED", "", "", r.summary[:160], ""
    mma = f"wgmma={r.wgmma}" if r.wgmma else f"mma.sync={r.mma_sync}" if r.mma_sync else "-"
    smem = f"{r.shared / 1024:.1f}" + ("" if r.fits else " too big")
    return (r.kernel, f"sm_{r.arch}", r.case, r.params, str(r.registers), f"{r.spill_stores}/{r.spill_loads}", smem,
            mma, f"{r.seconds:.1f}s")


def format_table(report: dict) -> str:
    rows = [_COLUMNS] + [_cells(r) for r in report["results"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    numeric = {"regs", "spill st/ld", "smem KiB", "time"}
    lines = ["  ".join(cell.rjust(w) if name in numeric else cell.ljust(w)
                       for cell, w, name in zip(row, widths, _COLUMNS, strict=True)).rstrip() for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def save(report: dict, found: list[str], args: argparse.Namespace) -> None:
    """STEM.json: what tests/test_compile_check.py checks the dispatch's plans against; STEM.txt: the table."""
    meta = {"command": "python bench/compile_check.py " + " ".join(sys.argv[1:]), "triton": triton.__version__,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "max_spill": args.max_spill,
            "gpus": {arch: dataclasses.asdict(GPUS[arch]) for arch in args.arch}}
    data = {"meta": meta, "results": [dataclasses.asdict(r) for r in report["results"]],
            "configs": report["configs"], "problems": found}
    args.save.with_suffix(".json").write_text(json.dumps(data, indent=0) + "\n")
    title = (f"# {meta['command']}: {meta['date']}, no GPU (fake sm_{', sm_'.join(map(str, args.arch))}); triton "
             f"{meta['triton']}, torch {meta['torch']}; registers/spills from ptxas")
    summary = f"{len(report['results'])} kernels compiled; " + (f"{len(found)} problems: " + "; ".join(found)
                                                                   if found else "no problems")
    args.save.with_suffix(".txt").write_text("\n".join([title, format_table(report), "", summary]) + "\n")


def read_saved(path: Path) -> dict:
    """A report file (the compiling process's, or one saved with --save), its results as Result objects."""
    data = json.loads(path.read_text())
    data["results"] = [Result(**r) for r in data["results"]]
    return data


def _archs(text: str) -> list[int]:
    archs = [int(part) for part in text.split(",") if part.strip()]
    unknown = [arch for arch in archs if arch not in GPUS]
    if unknown or not archs:
        raise argparse.ArgumentTypeError(f"--arch takes a comma list of {sorted(GPUS)}, got {text!r}")
    return archs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_archs, default=[90], help="compute capabilities, e.g. 90,80 (default 90)")
    parser.add_argument("--quick", action="store_true", help="a few configurations per kernel")
    parser.add_argument("--max-spill", type=int, default=DEFAULT_MAX_SPILL, help="bytes (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--save", type=Path, metavar="STEM",
                        help="also write STEM.json (the report, its problems and versions) and STEM.txt (the table)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # check()'s compiling process: report file
    parser.add_argument("--plans-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        report = compile_all(args.arch, args.quick, compile_=not args.plans_only)
        args.child.write_text(json.dumps(report))
        return 0
    reason = unavailable_reason()
    if reason is not None:
        print(f"compile_check: skipped: {reason}")
        return 0
    report = check(args.arch, args.quick, progress=not args.json)
    found = problems(report, args.max_spill)
    if args.save:
        save(report, found, args)
    if args.json:
        report["results"] = [dataclasses.asdict(r) for r in report["results"]]
        print(json.dumps({**report, "problems": found}, indent=1))
    else:
        print(format_table(report))
        for r in report["results"]:
            if not r.ok:
                print(f"\n{r.kernel} sm_{r.arch} {r.case} {r.params}:\n{r.error}")
        print(f"\n{len(report['results'])} kernels compiled for sm_{', sm_'.join(map(str, args.arch))}; "
              + (f"{len(found)} problems:\n  " + "\n  ".join(found) if found else "no problems"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
