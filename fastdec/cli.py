"""The ``fastdec`` command line: ``fastdec check``, ``fastdec decode``, ``fastdec bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
        def r(*shape, device=device):
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


def _read_latents(path: Path, key: str | None) -> torch.Tensor:
    """A latent tensor from .safetensors, .pt/.pth (torch.load, weights only), .npy or .npz; ``key`` picks one
    tensor of a file holding several."""
    if not path.is_file():
        raise FileNotFoundError(f"latents file {path} not found")
    import pickle

    from safetensors import SafetensorError

    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth", ".npy", ".npz"):
        raise ValueError(f"{path}: unsupported latents file type {suffix!r}; use .safetensors, .pt, .npy or .npz")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            content = load_file(str(path))
        elif suffix in (".pt", ".pth"):
            content = torch.load(path, map_location="cpu", weights_only=True)
        else:
            import numpy as np

            content = np.load(path, allow_pickle=False)
            content = {name: content[name] for name in content.files} if suffix == ".npz" else content
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"could not read latents from {path} ({type(error).__name__}: {reason})") from error
    if isinstance(content, dict):
        tensors = {name: value for name, value in content.items() if hasattr(value, "shape")}
        if key is not None:
            if key not in tensors:
                raise ValueError(f"{path} has no tensor {key!r}; its tensors: {sorted(tensors)}")
            content = tensors[key]
        elif len(tensors) == 1:
            content = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path} holds {len(tensors)} tensors {sorted(tensors)}: pick one with --key")
    elif key is not None:
        raise ValueError(f"{path} holds a single tensor, not a dict: drop --key")
    if not isinstance(content, torch.Tensor):
        import numpy as np

        if not isinstance(content, np.ndarray):
            raise ValueError(f"{path} holds a {type(content).__name__}, not a tensor")
        content = torch.from_numpy(content)
    return content


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device ({error}); use cpu, cuda or cuda:<index>") from error


def _decode(args: argparse.Namespace) -> int:
    """Decode a latents file to PNGs: one per batch item, <stem>_000.png, <stem>_001.png, ..."""
    import fastdec
    from fastdec.api import default_decoder_name, default_dtype

    try:
        latents = _read_latents(Path(args.latents), args.key)
        device = _device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
        if latents.dim() not in (3, 4):
            raise ValueError(f"{args.latents}: latents must be (C, h, w) or (B, C, h, w), got {tuple(latents.shape)}")
        batch = latents.unsqueeze(0) if latents.dim() == 3 else latents
        decoder = fastdec.load(args.decoder or default_decoder_name(batch.shape[1]), device=device, dtype=dtype)
        images = fastdec.decode(batch.to(device), decoder, output="pil", tile_size=args.tile_size)
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        digits = max(3, len(str(len(images) - 1)))
        for index, image in enumerate(images):
            path = output_dir / f"{Path(args.latents).stem}_{index:0{digits}d}.png"
            image.save(path)
            print(path)
    except (ValueError, TypeError, OSError) as error:  # fastdec.tiling.TileError is a ValueError
        print(f"fastdec decode: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="show which backend runs each op and check each against its reference")
    check.set_defaults(run=_check)
    decode = commands.add_parser(
        "decode", help="decode a latents file (.safetensors, .pt, .npy, .npz) to PNG images, one per batch item"
    )
    decode.add_argument("latents", help="latents (C, h, w) or (B, C, h, w), as a diffusion model produces them")
    decode.add_argument(
        "--decoder", help="a name (taesd, taef1, sdxl, ...) or path; default: the TAESD decoder for the channel count"
    )
    decode.add_argument("-o", "--output-dir", default=".", help="folder for <latents stem>_000.png, ... (default: .)")
    decode.add_argument("--key", help="the tensor to decode in a file holding several")
    decode.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    decode.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"],
        help="decoder dtype (default: bfloat16 on CUDA, else float32)",
    )
    decode.add_argument(
        "--tile-size", type=int,
        help="decode in exact slabs of this many pixel rows (bounded device memory, same pixels); 0: never; "
        "default: only when the untiled decode would not fit in free GPU memory",
    )
    decode.set_defaults(run=_decode)
    from fastdec import bench  # imports only argparse-level code until a benchmark runs

    bench_parser = commands.add_parser(
        "bench", help="time every decoder against diffusers on this device (speed, memory, fidelity)"
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
