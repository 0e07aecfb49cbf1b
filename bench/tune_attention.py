"""Time every attention launch candidate on this GPU and write the winners into the committed table
(kernels/support/attention_table.py), the only place fastdec.attention's configurations are timed.

    python bench/tune_attention.py [--out kernels/support/attention_table.py] [--dtypes bf16,fp16,fp32-tf32,fp32-ieee]

The shapes are every family's decode call (kernels/attention.py DECODE_SHAPES) and the benchmark shapes; each
lands in its bucket (kernels/support/attention_config.py ``bucket``) for this GPU's architecture, keeping the entries of
other architectures and buckets already in the file. Needs a CUDA GPU; bench/gpu_run.sh --tune runs it.
"""

from __future__ import annotations

import argparse
import datetime
import pprint
import runpy
import sys
from pathlib import Path

import torch

from fastdec.kernels import attention as attn
from fastdec.kernels.support import attention_config as config
from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton

ROOT = Path(__file__).resolve().parents[1]
TABLE_FILE = ROOT / "kernels" / "support" / "attention_table.py"
DTYPES = {"bf16": (torch.bfloat16, "tf32"), "fp16": (torch.float16, "tf32"), "fp32-tf32": (torch.float32, "tf32"),
          "fp32-ieee": (torch.float32, "ieee")}


def candidates(dtype: torch.dtype, precision: str, shape: tuple, device_index: int) -> list[config.AttentionConfig]:
    """Every usable tile of the shape with and without the key splits that fill the GPU."""
    capability, num_sms, shared = config.device_facts(device_index)
    batch, heads, tokens, head_dim = shape
    found = []
    for tile in config.usable_tiles(dtype, precision, head_dim, capability, shared):
        splits = config.kv_splits(config.programs(tile, batch * heads, tokens, head_dim), tokens, tile[1], num_sms)
        found += [config.config_of(tile, n) for n in sorted({1, splits})]
    return found


def tune(shape: tuple, dtype: torch.dtype, precision: str, device: torch.device
         ) -> tuple[config.AttentionConfig, float]:
    """(fastest candidate, its median microseconds); candidates that do not compile for lack of resources are
    skipped."""
    inputs = (config.wan_qkv(shape, lambda s: torch.randn(s, device=device, dtype=dtype)) if shape[3] == 384
              else tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(3)))
    timings = {}
    with config.tf32(precision == "tf32"), torch.cuda.device(device):
        for candidate in candidates(dtype, precision, shape, device.index or 0):
            try:
                timings[candidate] = triton.testing.do_bench(
                    lambda c=candidate: attn.launch_with_config(*inputs, None, c), warmup=25, rep=100,
                    return_mode="median")
            except triton.runtime.errors.OutOfResources:
                continue
    if not timings:
        raise RuntimeError(f"tune_attention: no candidate fits this GPU for {shape} {dtype}")
    best = min(timings, key=timings.get)
    return best, timings[best] * 1e3


def render(table: dict) -> str:
    """The table module's source: its docstring kept, TABLE written out."""
    text = TABLE_FILE.read_text()
    head = text[: text.index("TABLE:")]
    return head + "TABLE: dict[str, dict[str, dict]] = " + pprint.pformat(table, width=116, sort_dicts=True) + "\n"


def read_table(path: Path) -> dict:
    return runpy.run_path(str(path))["TABLE"]  # the file this script writes: data only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TABLE_FILE, help="table module to update (default: %(default)s)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of %(default)s")
    args = parser.parse_args(argv)
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    if TRITON_IMPORT_ERROR is not None or not torch.cuda.is_available():
        parser.error(f"needs a CUDA GPU with triton ({TRITON_IMPORT_ERROR or 'no CUDA device'})")
    device = torch.device("cuda", torch.cuda.current_device())
    capability = config.device_facts(device.index)[0]
    table = read_table(args.out) if args.out.exists() else {}
    entries = table.setdefault(config.arch_key(capability), {})
    date = datetime.date.today().isoformat()
    shapes = dict.fromkeys([*attn.DECODE_SHAPES.values(), *attn.BENCH_SHAPES])
    for name in args.dtypes.split(","):
        dtype, precision = DTYPES[name]
        for shape in shapes:
            best, micros = tune(shape, dtype, precision, device)
            key = config.bucket(dtype, precision, shape[0] * shape[1], shape[2], shape[2], shape[3])
            entries[key] = {"tile": [best.block_m, best.block_n, best.block_dv, best.num_warps, best.num_stages],
                            "kv_splits": best.kv_splits, "us": round(micros, 1),
                            "gpu": torch.cuda.get_device_name(device), "date": date}
            # written after every bucket: a run stopped by its time limit keeps what it timed
            args.out.write_text(render(table))
            print(f"{key}: {entries[key]['tile']} splits {best.kv_splits}, {micros:.1f} us", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
