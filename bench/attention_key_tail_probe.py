"""Which launches of the split-head-dim attention kernel are wrong on a GPU (issue 21: the first H200 run found head
dims 96 and 384 wrong with a masked key tail, cause unknown; kernels/_attention_config.py ``key_tail_unverified``).

Runs the kernel itself (``attention._launch``, no routing to the reference) for the calls that failed there, across
key counts (with and without a key tail) and tiles (warps, stages, block_n, whole or chunked output D), and prints
one line per launch with its error against float64 SDPA, so that one GPU call narrows the cause down:

    python bench/attention_key_tail_probe.py [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fastdec.kernels import _attention_config as config
from fastdec.kernels import attention as attn

# (name, (batch, heads, seq_q, head_dim), dtype, strided): the calls that failed on the H200
CALLS = [
    ("d96-fp16", (1, 2, 37, 96), torch.float16, False),
    ("d96-bf16", (2, 2, 333, 96), torch.bfloat16, False),
    ("d384-wan-bf16", (2, 1, 45, 384), torch.bfloat16, True),
]
KEYS = (45, 64, 128, 517)
TOLERANCE = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


def inputs(shape, keys: int, dtype: torch.dtype, strided: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, seq_q, head_dim = shape

    def make(s):
        return torch.randn(s, generator=generator).to("cuda", dtype)

    if strided:  # Wan's layout: q, k and v are chunks of one conv output, so seq_q == keys
        return config.wan_qkv((batch, heads, keys, head_dim), make)
    return make(shape), make((batch, heads, keys, head_dim)), make((batch, heads, keys, head_dim))


def probe(name, q, k, v, tile: config.AttentionConfig) -> dict:
    row = {"call": name, "q": list(q.shape), "keys": k.shape[2], "dtype": str(q.dtype).removeprefix("torch."),
           "block_m": tile.block_m, "block_n": tile.block_n, "block_dv": tile.block_dv, "kv_splits": tile.kv_splits,
           "num_warps": tile.num_warps, "num_stages": tile.num_stages, "key_tail": k.shape[2] % tile.block_n != 0}
    try:
        out = attn._launch(q, k, v, None, tile)
        torch.cuda.synchronize()
        expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        error = (out.double() - expected).abs()
        row["max_abs_error"] = error.max().item()
        # where the wrong values are: per query row and per output column, which parts of D and which rows
        bad = error > 8 * TOLERANCE[q.dtype]
        row["bad_fraction"] = bad.double().mean().item()
        row["bad_columns"] = bad.flatten(0, 2).any(0).nonzero().flatten().tolist()[:8]
        row["bad_rows"] = bad.any(-1).flatten(0, 1).any(0).nonzero().flatten().tolist()[:8]
        row["correct"] = row["max_abs_error"] <= 8 * TOLERANCE[q.dtype]
    except Exception as error:  # noqa: BLE001 - a compile failure is a finding, recorded per launch
        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        row["correct"] = False
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_key_tail_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows, start = [], time.time()
    for name, shape, dtype, strided in CALLS:
        batch, heads, seq_q, head_dim = shape
        main_d, _ = config.split_head_dim(head_dim)
        for keys in KEYS:
            q, k, v = inputs(shape, keys, dtype, strided)
            chosen = config.choose(attn.TABLE, 0, dtype, config.dot_precision(dtype, False), batch * heads,
                                   q.shape[2], keys, head_dim)
            tiles = [chosen]
            if keys == 45:  # the failing key count: vary one knob at a time around the dispatch's choice
                tiles += [config.AttentionConfig(chosen.block_m, chosen.block_n, chosen.block_dv, 1, w, s)
                          for w in (4, 8) for s in (1, 2, 3) if (w, s) != (chosen.num_warps, chosen.num_stages)]
                tiles += [config.AttentionConfig(chosen.block_m, n, chosen.block_dv, 1, chosen.num_warps,
                                                 chosen.num_stages) for n in (16, 32, 64) if n != chosen.block_n]
                tiles += [config.AttentionConfig(m, chosen.block_n, chosen.block_dv, 1, chosen.num_warps,
                                                 chosen.num_stages) for m in (16, 64) if m != chosen.block_m]
                tiles.append(config.AttentionConfig(chosen.block_m, chosen.block_n, main_d, 1, chosen.num_warps,
                                                    chosen.num_stages))  # output D in chunks: no acc_tail
            for tile in tiles:
                row = probe(name, q, k, v, tile)
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
