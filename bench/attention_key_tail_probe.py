"""Which launches of the split-head-dim attention kernel are wrong on a GPU (issue 21: the H200 runs found head dims
96 and 384 wrong with a masked key tail, cause unknown; kernels/support/attention_config.py ``key_tail_unverified``).

Runs the kernel itself (``attention.launch_with_config``, no routing to the reference) for the calls that failed there,
across key counts (with and without a key tail), tiles (warps, stages, block_n, block_m, whole or chunked output D), D
split in two parts or padded to one power of two, and the key tail peeled after the loop or masked in every step (is the
peeled step what goes wrong? the third H200 session's rows suggest it; a race with the loop's prefetches is ruled out,
tests/test_attention_gpu_findings.py). It prints one JSON line per launch with its error against float64 SDPA. Each
launch runs in a process of its own: the second H200 run hit an illegal memory access, after which every later launch in
the same process failed too.

    python bench/attention_key_tail_probe.py [--out probe.json] [--workers 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

# name: ((batch, heads, seq_q, head_dim), dtype, Wan's strided q/k/v): the calls that failed on the H200
CALLS = {
    "d96-fp16": ((1, 2, 37, 96), "float16", False),
    "d96-bf16": ((2, 2, 333, 96), "bfloat16", False),
    "d384-wan-bf16": ((2, 1, 45, 384), "bfloat16", True),
}
KEYS = (45, 64, 128, 517)
TOLERANCE = {"float16": 2**-10, "bfloat16": 2**-7}


def launches() -> list[dict]:
    """Every launch to try: the dispatch's tile at each key count, split and padded, and split with the key tail
    masked in the loop; at 45 keys (a key tail at every block_n) also one knob at a time changed from the dispatch's
    tile, peeled and masked in the loop."""
    specs = []
    for call in CALLS:
        for keys in KEYS:
            specs += [{"call": call, "keys": keys, "split": split, "peel": True, "change": {}}
                      for split in (True, False)]
            if keys % 16:  # a key tail at every block_n (16, 32, 64, 128): only then does peeling matter
                specs.append({"call": call, "keys": keys, "split": True, "peel": False, "change": {}})
        changes = [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2, 3)]
        changes += [{"block_n": n} for n in (16, 32, 64)] + [{"block_m": m} for m in (16, 64, 128)]
        changes.append({"block_dv": "main"})  # output D in chunks of D's main part: no acc_tail
        specs += [{"call": call, "keys": 45, "split": True, "peel": peel, "change": change}
                  for change in changes for peel in (True, False)]
    return specs


def run_one(spec: dict) -> dict:
    """One launch, in this process (a fresh one: see the module docstring)."""
    from fastdec.kernels import attention as attn
    from fastdec.kernels.support import attention_config as config

    (batch, heads, seq_q, head_dim), dtype_name, strided = CALLS[spec["call"]]
    dtype, keys = getattr(torch, dtype_name), spec["keys"]
    generator = torch.Generator().manual_seed(0)

    def make(shape):
        return torch.randn(shape, generator=generator).to("cuda", dtype)

    if strided:  # Wan's layout: chunks of one conv output, so seq_q == keys
        q, k, v = config.wan_qkv((batch, heads, keys, head_dim), make)
    else:
        q, k, v = make((batch, heads, seq_q, head_dim)), *(make((batch, heads, keys, head_dim)) for _ in range(2))
    tile = config.choose(attn.TABLE, 0, dtype, config.dot_precision(dtype, False), batch * heads, q.shape[2], keys,
                         head_dim)
    change = {name: config.split_head_dim(head_dim)[0] if value == "main" else value
              for name, value in spec["change"].items()}
    tile = dataclasses.replace(tile, **change)
    row = {**spec, **dataclasses.asdict(tile), "key_tail": keys % tile.block_n != 0}
    try:
        out = attn.launch_with_config(q, k, v, None, tile, split_head_dim=spec["split"], peel_key_tail=spec["peel"])
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - a failed launch is this probe's finding
        return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}", "correct": False}
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    error = (out.double() - expected).abs()
    bad = error > 8 * TOLERANCE[dtype_name]
    return {**row, "max_abs_error": error.max().item(), "bad_fraction": bad.double().mean().item(),
            "first_bad_columns": bad.flatten(0, 2).any(0).nonzero().flatten().tolist()[:6],
            "first_bad_rows": bad.any(-1).flatten(0, 1).any(0).nonzero().flatten().tolist()[:6],
            "correct": not bad.any().item()}


def run_isolated(spec: dict, limit: float = 120) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"no answer in {limit:.0f} s", "correct": False}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {**spec, "error": f"process exit {done.returncode}: {tail}", "correct": False}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--workers", type=int, default=8, help="launches at a time, each in its own process")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one launch's spec (JSON), run in this process
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_key_tail_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    start, rows = time.time(), []
    with ThreadPoolExecutor(args.workers) as pool:
        for row in pool.map(run_isolated, launches()):
            rows.append(row)
            print(json.dumps(row), flush=True)
    wrong = [r for r in rows if not r["correct"]]
    print(f"attention_key_tail_probe: {len(rows)} launches, {len(wrong)} wrong, {time.time() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
