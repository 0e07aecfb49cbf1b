"""The ``fastdec`` command line: ``fastdec check``, ``decode``, ``bench``, ``batch``, ``train``, ``eval``."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from fastdec.latents_io import read_latents


def _check(args: argparse.Namespace) -> int:
    """Print the backend table, then run every op once on random data against its eager reference."""
    from fastdec import ops

    print(ops.format_backends(), "\n")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" not in devices:
        print("no GPU here (torch.cuda.is_available() is False): the CUDA column is what would run on one, and is "
              "not checked\n")
    g = torch.Generator().manual_seed(0)
    failures = checked = 0
    for device in devices:
        def r(*shape, device=device):
            return torch.randn(*shape, generator=g).to(device)

        for name, module in ops.OP_MODULES.items():
            backend = ops.backends()[name][device]
            if backend.startswith("eager"):  # the op *is* its reference here: comparing them would prove nothing
                why = backend.partition(": ")[2] or (
                    "the Triton kernels run on CUDA; on CPU set FASTDEC_TRITON_INTERPRET=1 TRITON_INTERPRET=1 to "
                    "check them through Triton's interpreter" if device == "cpu" else "no fused kernel for this op")
                print(f"skip {name:15s} {device:5s} skipped: no fused backend runs here ({why})")
                continue
            call = module.check_call(r)
            out, expected = getattr(ops, name)(*call), getattr(module, f"{name}_reference")(*call)
            error = (out.double() - expected.double()).abs().max().item()
            ok = bool(torch.isfinite(out).all()) and error <= 1e-4 * max(1.0, expected.abs().max().item())
            failures += not ok
            checked += 1
            print(f"{'ok  ' if ok else 'FAIL'} {name:15s} {device:5s} max|err| {error:.2e}  ({backend})")
    if not checked:
        print("nothing checked: no fused kernel runs in this process (see the skipped lines)")
    return 1 if failures else 0


def _progress_bar(label: str, done: int, total: int) -> None:
    """A one-line progress bar on stderr; ``functools.partial(_progress_bar, label)`` is a decode_stream progress."""
    filled = 30 * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} latent frames", end=end, file=sys.stderr,
          flush=True)


def _decode_video(args: argparse.Namespace, latents: torch.Tensor, device: torch.device, dtype) -> list[Path]:
    """5-D latents (B, C, T, h, w) -> one mp4 per video: <stem>.mp4 (a batch: <stem>_000.mp4, ...). Each video is
    written as the decoder's ``decode_stream`` yields its frames (TAEHV: chunk by chunk, memory flat in T)."""
    import fastdec
    from fastdec.api import default_video_decoder_name
    from fastdec.validate import check_latents
    from fastdec.video import save_video

    if args.chunk_frames is not None and args.chunk_frames < 1:
        raise ValueError(f"--chunk-frames must be >= 1 (latent frames per step), got {args.chunk_frames}")
    if not args.fps > 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")

    decoder = fastdec.load(args.decoder or default_video_decoder_name(latents.shape[1]), device=device, dtype=dtype)
    latents = latents.to(device)
    check_latents(latents, decoder)
    chunking = {} if args.chunk_frames is None else {"chunk_frames": args.chunk_frames}
    output_dir, stem = Path(args.output_dir), Path(args.latents).stem
    paths = []
    for index in range(latents.shape[0]):
        name = f"{stem}.mp4" if latents.shape[0] == 1 else f"{stem}_{index:03d}.mp4"
        bar = None if args.no_progress else functools.partial(_progress_bar, name)
        frames = decoder.decode_stream(latents[index:index + 1].to(dtype), check_finite=False, progress=bar,
                                       **chunking)
        paths.append(save_video(frames, output_dir / name, fps=args.fps))
    return paths


def _encode(args: argparse.Namespace) -> int:
    """Images -> one latents file (B, C, h, w), written atomically."""
    import fastdec
    from fastdec.files import write_atomically

    try:
        from PIL import Image
        from safetensors.torch import save_file

        output = Path(args.output)
        if output.suffix != ".safetensors":
            raise ValueError(f"-o {output}: the latents are written as .safetensors; name the file <name>.safetensors")
        pictures = []
        for name in args.images:
            with Image.open(name) as picture:
                pictures.append(picture.convert("RGB"))
        latents = fastdec.encode(pictures, encoder=args.encoder, device=args.device or "cpu")
        write_atomically(output, lambda tmp: save_file({"latents": latents.cpu().contiguous()}, str(tmp)))
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"fastdec encode: error: {error}", file=sys.stderr)
        return 2
    print(output)
    return 0


def _decode(args: argparse.Namespace) -> int:
    """Decode a latents file to PNGs (one per batch item, <stem>_000.png, ...) or, for video latents
    (B, C, T, h, w), to <stem>.mp4."""
    import fastdec
    from fastdec.api import default_decoder_name, default_dtype
    from fastdec.batch.work import resolve_device

    try:
        latents = read_latents(Path(args.latents), args.key)
        device = resolve_device(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
        if latents.dim() == 5:
            for path in _decode_video(args, latents, device, dtype):
                print(path)
            return 0
        if latents.dim() not in (3, 4):
            raise ValueError(
                f"{args.latents}: latents must be (C, h, w) or (B, C, h, w), or video latents (B, C, T, h, w), got "
                f"{tuple(latents.shape)}"
            )
        batch = latents.unsqueeze(0) if latents.dim() == 3 else latents
        name = args.decoder or default_decoder_name(batch.shape[1])
        output_dir = Path(args.output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise ValueError(f"-o {output_dir} is an existing file: pass a folder for the PNGs (created if missing)")
        decoder = fastdec.load(name, device=device, dtype=dtype)
        images = fastdec.decode(batch.to(device), decoder, output="pil", tile_size=args.tile_size)
        output_dir.mkdir(parents=True, exist_ok=True)
        digits = max(3, len(str(len(images) - 1)))
        for index, image in enumerate(images):
            path = output_dir / f"{Path(args.latents).stem}_{index:0{digits}d}.png"
            image.save(path)
            print(path)
    except (ValueError, TypeError, OSError, ImportError) as error:  # fastdec.tiling.TileError is a ValueError
        print(f"fastdec decode: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # save_video removes the video it was writing: what is listed above is whole
        print("\nfastdec decode: interrupted; the file being written was removed (those printed are complete); run "
              "the same command to decode again", file=sys.stderr)
        return 130  # the shell's status for a SIGINT
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastdec", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fastdec: diffusion latents to images, fast.\n\n"
                    "  check   which backend runs each op here, each checked against its reference\n"
                    "  encode  photos to a latents file (the input of decode)\n"
                    "  decode  a latents file to PNG images (video latents to an mp4)\n"
                    "  bench   every decoder timed against diffusers on this machine\n"
                    "  batch   a whole dataset of latents to images or mp4s (local threads or Ray), resumable\n"
                    "  train   a decoder on a frozen encoder's latent space\n"
                    "  distill a smaller, faster decoder made from a teacher decoder\n"
                    "  eval    PSNR, SSIM, LPIPS and speed of decoders on held-out images",
        epilog="examples:\n"
               "  fastdec decode latents.safetensors --decoder taesdxl -o out/\n"
               "  fastdec bench --quick          (writes its tables, JSON and plot to the folder it names at the end)\n"
               "\n'fastdec COMMAND --help' shows a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="show which backend runs each op and check each against its reference",
        description="Prints which backend runs each fastdec op on CPU and CUDA here (and why a fallback), then runs "
                    "each fused op against its eager reference on small inputs: 'ok' where a fused kernel ran and "
                    "matched, 'skipped' (and why) where the op runs its own reference.")
    check.set_defaults(run=_check)
    decode = commands.add_parser(
        "decode", help="decode a latents file (.safetensors, .pt, .npy, .npz) to PNG images, one per batch item, or "
        "video latents (B, C, T, h, w) to an H.264 mp4 per video"
    )
    decode.add_argument(
        "latents", help="latents (C, h, w), (B, C, h, w) or video (B, C, T, h, w), as a diffusion model produces them"
    )
    decode.add_argument(
        "--decoder", help="a name (taesd, taef1, sdxl, ...) or path; default: the TAESD decoder for the channel count"
    )
    decode.add_argument(
        "-o", "--output-dir", default=".", help="folder for <latents stem>_000.png, ... or <stem>.mp4 (default: .)"
    )
    decode.add_argument("--fps", type=float, default=16.0, help="frame rate of the mp4 for video latents (default 16)")
    decode.add_argument(
        "--chunk-frames", type=int, help="video: latent frames decoded per step (default: about a tenth of the clip, "
        "within the decoder's memory budget)"
    )
    decode.add_argument("--no-progress", action="store_true", help="video: no progress bar on stderr")
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
    encode = commands.add_parser(
        "encode", help="encode images (PNG, JPEG, ...) of one size to a latents file that fastdec decode reads",
        description="Encodes images into diffusion latents with a TAESD-family encoder .pth or a diffusers VAE, "
                    "written as one (B, C, h, w) tensor 'latents' in a .safetensors file.")
    encode.add_argument("images", nargs="+", help="image files, all of one size (sides multiples of 8)")
    encode.add_argument("--encoder", required=True, help="a TAESD-family encoder .pth (e.g. taef2_encoder.pth), or "
                        "a diffusers AutoencoderKL / AutoencoderTiny folder or Hub id")
    encode.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    encode.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    encode.set_defaults(run=_encode)
    from fastdec import bench, evaluation  # these import only argparse-level code until a command runs
    from fastdec.batch import cli as batch_cli
    from fastdec.train import cli as train_cli
    from fastdec.train import distill

    # The application commands: each a module with add_arguments(parser) and run(args) -> int.
    for name, module, summary in (
        ("bench", bench, "time every decoder against diffusers on this device (speed, memory, fidelity)"),
        ("batch", batch_cli,
         "decode a dataset of latents (a folder of files or Parquet) to images, resumable, local or Ray"),
        ("train", train_cli, "train a decoder on a frozen encoder's latent space"),
        ("distill", distill, "a smaller, faster decoder from a teacher: prune, distil, fine-tune, then measure the "
         "frontier"),
        ("eval", evaluation, "PSNR, SSIM, LPIPS and speed of decoders on held-out images"),
    ):
        command = commands.add_parser(name, help=summary)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    typed = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(typed)
    from fastdec.wording import cli_words

    with cli_words():  # the library's advice says what to type (--decoder taef1), not what to write in Python
        if args.command == "bench":  # the bench records its command as typed: fastdec bench ARGS
            return bench.run(args, typed[typed.index("bench") + 1:])
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
