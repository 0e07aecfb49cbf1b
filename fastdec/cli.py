"""The ``fastdec`` command line: ``fastdec check``, ``fastdec decode``, ``fastdec bench``."""

from __future__ import annotations

import argparse
import sys

import torch


def _check(args: argparse.Namespace) -> int:
    """Print the backend table, then run every op once on random data against its eager reference."""
    from fastdec import ops
    from fastdec.kernels import attention, group_norm_act, patch_unembed, pixel_shuffle

    print(ops.format_backends(), "\n")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    g = torch.Generator().manual_seed(0)
    failures = 0
    for device in devices:
        def r(*shape):
            return torch.randn(*shape, generator=g).to(device)

        cases = {
            "group_norm_act": (ops.group_norm_act, group_norm_act.group_norm_act_reference,
                               (r(1, 96, 17, 9), 32, r(96), r(96), 1e-6, "silu")),
            "attention": (ops.attention, attention.attention_reference, (r(1, 2, 33, 64), r(1, 2, 33, 64),
                                                                         r(1, 2, 33, 64), None)),
            "patch_unembed": (ops.patch_unembed, patch_unembed.patch_unembed_reference,
                              (r(2, 12, 4 * 4 * 3), 4, 3, 4, r(48), "to_unit", None)),
            "pixel_shuffle": (ops.pixel_shuffle, pixel_shuffle.pixel_shuffle_reference, (r(1, 32, 9, 7), 2, 1)),
        }
        for name, (op, reference, call) in cases.items():
            out, expected = op(*call), reference(*call)
            error = (out.double() - expected.double()).abs().max().item()
            ok = bool(torch.isfinite(out).all()) and error <= 1e-4 * max(1.0, expected.abs().max().item())
            failures += not ok
            backend = ops.backends()[name][device]
            print(f"{'ok  ' if ok else 'FAIL'} {name:15s} {device:5s} max|err| {error:.2e}  ({backend})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="show which backend runs each op and check each against its reference")
    check.set_defaults(run=_check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
