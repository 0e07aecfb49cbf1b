"""Exact tiled decoding (fastdec.tiling) and patch-parallel decoding (fastdec.parallel): tiled == untiled for every
decoder family, parallel == single-process over gloo with 2 CPU processes, real TAEF2 weights, bad input."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import needs_interpreter, record_kernel_launches, relative_error
from PIL import Image
from torch import nn

import fastdec
from fastdec import ops, tiling
from fastdec.models.autoencoder_kl import AutoencoderKLDecoder
from fastdec.models.base import Decoder
from fastdec.models.dcae import PRESETS as DCAE_PRESETS
from fastdec.models.dcae import DCAEDecoder
from fastdec.models.flux2 import Flux2VAEDecoder
from fastdec.models.preview import LatentPreview
from fastdec.models.svd import SVDDecoder
from fastdec.models.tae_temporal import TAETemporalDecoder
from fastdec.models.taehv import TAEHVDecoder
from fastdec.models.taesd import TAESDDecoder, TAESDEncoder
from fastdec.models.vit import ViTDecoder
from fastdec.models.wan import WanDecoder
from fastdec.tiling import HostTiles, TiledRun, TileError, even_bounds, run_decode, tiled_decode

TAEF2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "taef2"


class ToyVideoDecoder(Decoder):
    """Ops no image family uses yet, as a video decoder would: 5-D latents, F.pad + conv3d without padding (a
    causal conv), nn.GroupNorm (aten.native_group_norm), a channel RMS norm, nearest upsampling, a 5x5 conv."""

    latent_ndim = 5
    output_range = "-1,1"

    def __init__(self, latent_channels: int = 4, width: int = 8):
        super().__init__()
        self.latent_channels, self.config = latent_channels, {"latent_channels": latent_channels, "width": width}
        self.conv_in = nn.Conv3d(latent_channels, width, 3)
        self.norm = nn.GroupNorm(2, width)
        self.conv_mid = nn.Conv3d(width, width, (1, 5, 5), padding=(0, 2, 2))
        self.conv_out = nn.Conv3d(width, 3, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, z):
        x = self.conv_in(F.pad(z, (1, 1, 1, 1, 2, 0)))  # causal in time, zero border in space
        x = F.silu(self.norm(x))
        x = F.normalize(x, dim=1) * x.shape[1] ** 0.5  # RMS norm over channels: per pixel
        b, c, t, h, w = x.shape
        x = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=2, mode="nearest")
        x = x.reshape(b, t, c, 2 * h, 2 * w).transpose(1, 2)
        return self.conv_out(self.conv_mid(x).relu_())


class WideHaloDecoder(Decoder):
    """One 7x7 conv (a halo of 3 rows) at latent resolution, then a x2 pixel shuffle."""

    def __init__(self):
        super().__init__()
        self.latent_channels, self.config = 4, {}
        self.conv = nn.Conv2d(4, 12, 7, padding=3)

    def forward(self, z):
        return ops.pixel_shuffle(self.conv(z), 2)


def families() -> dict[str, Decoder]:
    """Tiny configurations of every family (fp32, random weights)."""
    evit = dict(DCAE_PRESETS["efficientvit"][1], block_out_channels=(8, 8, 8, 16, 16, 16),
                layers_per_block=(0, 1, 1, 0, 0, 0))
    return {
        "autoencoder_kl": AutoencoderKLDecoder(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
        "autoencoder_kl_flux": AutoencoderKLDecoder(
            latent_channels=16, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=4,
            use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
        "flux2": Flux2VAEDecoder(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1),
        "taesd": TAESDDecoder("taesd", width=16, blocks=(1, 1, 1, 1)),
        "taef2": TAESDDecoder("taef2", width=16, blocks=(2, 1, 1, 1)),
        "dcae": DCAEDecoder(block_out_channels=(8, 8, 16, 16, 32, 32), attention_head_dim=8),
        "dcae_efficientvit": DCAEDecoder(**evit, latent_channels=4),
        "vit": ViTDecoder(dim=32, depth=1, num_heads=2, mlp_ratio=1.0),
        "preview": LatentPreview(4),
        "wan": WanDecoder(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                          latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]),
        "taehv": TAEHVDecoder("taew2_1"),
        "svd": SVDDecoder(block_out_channels=(32, 32), layers_per_block=1),
        "tae_temporal": TAETemporalDecoder(width=64, blocks=(1, 1), attention_head_dim=32),
        "toy_video": ToyVideoDecoder(),
    }


# Latent rows per slab tried for each family (the rest: 1 and 3); the ViT's latent patch is 2x2, and the video
# families are slower, so they get one split.
TILE_ROWS = {"vit": (2, 3), "dcae": (1,), "wan": (2,), "taehv": (2,), "svd": (2,), "tae_temporal": (2,)}
LATENT_ROWS = {"dcae": 4, "dcae_efficientvit": 4, "wan": 6, "taehv": 6}


def _latents(decoder: Decoder, rows: int = 10, cols: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    video = decoder.latent_ndim == 5
    shape = (1 if video else 2, decoder.latent_channels) + ((2,) if video else ()) + (rows, cols)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("name", list(families()))
@torch.no_grad()
def test_tiled_equals_untiled(name):
    torch.manual_seed(0)
    decoder = families()[name].eval()
    latents = _latents(decoder, rows=LATENT_ROWS.get(name, 10), cols=3 if name.startswith("dcae") else 6)
    with ops.reference_ops():  # the decomposition is under test, not the kernels (their own tests cover them)
        _check_tiled_equals_untiled(name, decoder, latents)


@pytest.mark.parametrize("name", [name for name, decoder in families().items() if decoder.channels_last_on_cuda])
@torch.no_grad()
def test_tiled_equals_untiled_channels_last(name):
    """The layout fastdec.decode gives these decoders on a GPU (Decoder.channels_last_on_cuda)."""
    torch.manual_seed(0)
    decoder = families()[name].eval().to(memory_format=torch.channels_last)
    latents = _latents(decoder, rows=LATENT_ROWS.get(name, 10), cols=3 if name.startswith("dcae") else 6)
    with ops.reference_ops():
        _check_tiled_equals_untiled(name, decoder, latents)


def _check_tiled_equals_untiled(name, decoder, latents):
    reference = decoder.decode(latents)
    h = latents.shape[-2]
    for rows in TILE_ROWS.get(name, (1, 3)):
        run = TiledRun(HostTiles("cpu"), h, even_bounds(h, -(-h // rows)))
        out = run_decode(decoder, latents, run)
        assert isinstance(out, tiling.SlabTensor), "the image is made in slabs, never whole"
        out = run.executor.gather(out)
        assert out.shape == reference.shape
        assert relative_error(out, reference) < 1e-4, (name, rows)
        # Only latent-resolution tensors are ever seen whole (attention, tokens): memory stays bounded by a slab.
        assert all(shape[-2] <= latents.shape[-2] for _, shape in run.gathers), run.gathers


@needs_interpreter("group_norm_act")
@torch.no_grad()
def test_tiled_group_norm_runs_the_fused_kernels_per_slab(monkeypatch):
    """Each slab's statistics come from group_norm_act's stats kernel and each slab is normalized by its fused
    normalize kernel with the merged statistics (not var_mean + batch_norm + the activation)."""
    from fastdec.kernels import group_norm_act as gna

    decoder = families()["autoencoder_kl"].eval()
    latents = _latents(decoder)
    with ops.reference_ops():
        reference = decoder.decode(latents)
    kernels = {"stats": "_group_norm_stats_kernel", "act": "_group_norm_act_kernel"}
    launches = record_kernel_launches(monkeypatch, gna, kernels, "group_norm_act_given_stats_reference")
    h = latents.shape[-2]
    run = TiledRun(HostTiles("cpu"), h, even_bounds(h, 4))
    out = run.executor.gather(run_decode(decoder, latents, run))
    assert relative_error(out, reference) < 1e-4
    assert launches["stats"].launches >= 3 and launches["act"].launches >= 3  # at least one norm over 3 slabs


@torch.no_grad()
def test_device_memory_is_bounded_by_the_slab():
    """The largest slab moved to the compute device shrinks with the tile size (HostTiles' accounting)."""
    decoder = families()["autoencoder_kl"].eval()
    latents = _latents(decoder, rows=16, cols=8)
    peaks = {}
    for tiles in (1, 4, 8):
        run = TiledRun(HostTiles("cpu"), 16, even_bounds(16, tiles))
        with ops.reference_ops():
            run_decode(decoder, latents, run)
        peaks[tiles] = run.executor.peak_slab_bytes
    assert peaks[4] < 0.4 * peaks[1] and peaks[8] < 0.6 * peaks[4], peaks


@torch.no_grad()
def test_decode_api_and_decoder_option(caplog):
    decoder = families()["taef2"].eval()
    latents = _latents(decoder, rows=6)
    reference = fastdec.decode(latents, decoder, tile_size=0)
    assert relative_error(fastdec.decode(latents, decoder, tile_size=16), reference) < 1e-4
    assert relative_error(fastdec.decode(latents[0], decoder, tile_size=24, output="tensor"), reference[0]) < 1e-4
    assert relative_error(tiled_decode(decoder, latents, 8), reference) < 1e-4
    decoder.tile_size = 16
    try:
        assert relative_error(decoder.decode(latents), reference) < 1e-4
        assert relative_error(fastdec.decode(latents, decoder), reference) < 1e-4
    finally:
        decoder.tile_size = None
    # Automatic tiling: only when the estimated untiled peak does not fit, with a log line; never on CPU by itself.
    need = tiling.estimate_decode_bytes(decoder, latents)
    assert need > 0 and tiling.auto_tile_size(decoder, latents) is None
    assert tiling.auto_tile_size(decoder, latents, free_bytes=2 * need) is None
    with caplog.at_level(logging.WARNING, logger="fastdec"):
        size = tiling.auto_tile_size(decoder, latents, free_bytes=need // 2)
    assert size is not None and size % 8 == 0 and size < 6 * 8
    assert "slabs of" in caplog.text and "GiB free" in caplog.text


@torch.no_grad()
def test_cpu_decodes_too_large_for_host_memory_are_tiled_or_refused_up_front(monkeypatch, caplog):
    """On the CPU as on CUDA: an untiled peak over the memory this process may take is tiled (a log line says so),
    and one that fits in no slab is refused before anything is allocated, with the numbers."""
    from fastdec.tiling import planning

    decoder = families()["taef2"].eval()
    latents = _latents(decoder, rows=6)
    reference = fastdec.decode(latents, decoder, tile_size=0)
    need = tiling.estimate_decode_bytes(decoder, latents)
    assert planning.free_device_bytes(torch.device("cpu")) > 0
    monkeypatch.setattr(planning, "host_available_bytes", lambda: need // 2)
    with caplog.at_level(logging.WARNING, logger="fastdec"):
        tiled = fastdec.decode(latents, decoder)
    assert "slabs of" in caplog.text and relative_error(tiled, reference) < 1e-4
    monkeypatch.setattr(planning, "host_available_bytes", lambda: need // 100)
    with pytest.raises(tiling.TileError, match=r"needs about .* GiB untiled .* GiB free on cpu: decode fewer"):
        fastdec.decode(latents, decoder)


@torch.no_grad()
def test_out_of_memory_untiled_is_retried_in_slabs(monkeypatch, caplog):
    """An out-of-memory error of an automatic untiled decode (CUDA's; simulated) is retried exactly in slabs, with a
    log line; tile_size=0 (never tile) lets it through."""
    import contextlib

    from fastdec.tiling import decoding

    decoder = families()["taef2"].eval()
    latents = _latents(decoder, rows=6)
    reference = fastdec.decode(latents, decoder, tile_size=0)

    @contextlib.contextmanager
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        yield

    monkeypatch.setattr(decoding, "untiled", out_of_memory)
    with caplog.at_level(logging.WARNING, logger="fastdec"):
        retried = tiling.decode(decoder, latents)
    assert "out of memory" in caplog.text and "retrying exactly in slabs of 24 pixel rows" in caplog.text
    assert relative_error(retried, reference) < 1e-4
    with pytest.raises(torch.OutOfMemoryError):
        tiling.decode(decoder, latents, tile_size=0)


@torch.no_grad()
def test_decode_api_video_latents():
    decoder = families()["toy_video"].eval()
    latents = _latents(decoder, rows=6)
    frames = fastdec.decode(latents, decoder, tile_size=0)
    assert relative_error(fastdec.decode(latents, decoder, tile_size=4), frames) < 1e-4


def test_bad_input_errors():
    decoder = families()["taesd"].eval()
    latents = _latents(decoder, rows=4)
    with pytest.raises(TileError, match="not a multiple of TAESDDecoder's latent-to-pixel factor 8"):
        fastdec.decode(latents, decoder, tile_size=12)
    with pytest.raises(TileError, match="positive number of pixel rows"):
        tiled_decode(decoder, latents, -8)
    wide = WideHaloDecoder().eval()
    with pytest.raises(TileError, match="tiles too small for a 7-tap convolution.*larger tile_size"):
        tiled_decode(wide, latents, 2)  # one latent row per slab, the conv needs 3 from each side
    assert tiled_decode(wide, latents, 6).shape == (2, 3, 8, 12)  # 3-row slabs cover the halo
    with pytest.raises(TileError, match="cannot split 4 latent rows into 5 slabs"):
        even_bounds(4, 5)
    slab = tiling.SlabTensor({0: torch.zeros(1, 1, 2, 2)}, (0, 2), 2, (1, 1, 2, 2), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="outside its tiling run"):
        slab + 1


# --- parallel: 2 CPU processes over gloo ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parallel_worker(rank: int, world: int, port: int, results, folder: str) -> None:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with ops.reference_ops():
            out = {"failure": None}
            try:
                out.update(_parallel_decodes())
                from fastdec import parallel  # the torchrun entry point, inside the group started here

                out["main"] = parallel.main([f"{folder}/latents.pt", "--decoder", f"{folder}/decoder", "-o", folder])
            except Exception as error:  # report it to the test instead of leaving it waiting on the queue
                results.put((rank, {"failure": repr(error)}))
                raise
            results.put((rank, out))
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def _parallel_decodes() -> dict:
    from fastdec import parallel

    out = {}
    for name in ("autoencoder_kl", "taef2"):
        torch.manual_seed(0)
        decoder = families()[name].eval()
        latents = _latents(decoder, rows=7, cols=5)
        reference = decoder.decode(latents)
        image = parallel.decode(decoder, latents)
        everywhere = parallel.decode(decoder, latents, output="all")
        shard = parallel.decode(decoder, latents, output="sharded")
        lo, hi = shard.rows
        out[name] = {
            "rank0": None if image is None else relative_error(image, reference),
            "all": relative_error(everywhere, reference),
            "shard": relative_error(shard.image, reference[..., lo:hi, :]),
            "rows": shard.rows, "height": shard.height,
        }
    try:
        parallel.decode(families()["taesd"].eval(), torch.randn(1, 4, 1, 4))
    except TileError as error:
        out["error"] = str(error)
    return out


def test_parallel_equals_single_process_gloo(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    TAESDDecoder("taesd", width=8, blocks=(1, 1)).save_pretrained(tmp_path / "decoder")
    torch.save(_latents(TAESDDecoder("taesd"), rows=5, cols=4)[:1], tmp_path / "latents.pt")

    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_parallel_worker, args=(rank, 2, port, results, str(tmp_path)))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    got = dict(results.get(timeout=900) for _ in workers)  # generous: a loaded CI machine
    assert got[0]["failure"] is None and got[1]["failure"] is None, got
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    for name in ("autoencoder_kl", "taef2"):
        factor = 2 if name == "autoencoder_kl" else 8
        assert got[0][name]["rank0"] < 1e-4 and got[1][name]["rank0"] is None
        for rank in (0, 1):
            assert got[rank][name]["all"] < 1e-4 and got[rank][name]["shard"] < 1e-4
        assert got[0][name]["rows"] == (0, 3 * factor) and got[1][name]["rows"] == (3 * factor, 7 * factor)
    assert "world size 2 is larger than the number of latent rows 1" in got[0]["error"]
    assert got[0]["main"] == got[1]["main"] == 0  # python -m fastdec.parallel: rank 0 writes the PNG
    expected = fastdec.decode(torch.load(tmp_path / "latents.pt"), fastdec.load(tmp_path / "decoder"), output="uint8")
    assert (torch.from_numpy(np.asarray(Image.open(tmp_path / "latents_000.png"))) == expected[0]).all()


def test_cli_tile_size(tmp_path, capsys):
    from fastdec.cli import main

    torch.manual_seed(0)
    TAESDDecoder("taesd", width=8, blocks=(1, 1)).save_pretrained(tmp_path / "decoder")
    latents = _latents(TAESDDecoder("taesd"), rows=5, cols=4)
    torch.save(latents, tmp_path / "z.pt")
    args = ["decode", str(tmp_path / "z.pt"), "--decoder", str(tmp_path / "decoder"), "--device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "tiled"), "--tile-size", "4"]) == 0
    assert main([*args, "-o", str(tmp_path / "whole"), "--tile-size", "0"]) == 0
    for name in ("z_000.png", "z_001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "tiled" / name)),
                              np.asarray(Image.open(tmp_path / "whole" / name)))
    assert main([*args, "--tile-size", "3"]) == 2
    assert "not a multiple of TAESDDecoder's latent-to-pixel factor 2" in capsys.readouterr().err


def test_parallel_needs_a_process_group():
    from fastdec import parallel

    decoder = families()["taesd"].eval()
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.decode(decoder, _latents(decoder))


# --- real weights --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~50 s on 2 cores; test_tiled_equals_untiled covers every family at small sizes in CI
@pytest.mark.skipif(not (TAEF2 / "taef2_decoder.pth").is_file(), reason=f"TAEF2 weights not found in {TAEF2}")
@torch.no_grad()
def test_taef2_real_weights_1536_photo_tiled_equals_untiled():
    """The real TAEF2 decoder on the latent of a 1536x1536 photo, in 512-row slabs, equals the untiled decode within
    1e-5. The latent is tiled from a real photo's: scikit-image's astronaut at 768x768 through the real TAEF2 encoder
    (96x96), mirrored 2x2 to 192x192 (encoding 1536x1536 directly would add 1.1 TFLOP). Reference ops (no Triton
    interpreter) keep the CPU time down: the two 1536x1536 decodes are 1.15 TFLOP each."""
    import skimage.data

    encoder = TAESDEncoder.from_pth(TAEF2 / "taef2_encoder.pth", "taef2")
    decoder = TAESDDecoder.from_pth(TAEF2 / "taef2_decoder.pth", "taef2")
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(768, 768), mode="bilinear", antialias=True)
    start = time.perf_counter()
    with ops.reference_ops():
        quarter = encoder.encode(image)
        top = torch.cat([quarter, quarter.flip(-1)], -1)
        latents = torch.cat([top, top.flip(-2)], -2)
        reference = decoder.decode(latents)
        tiled = tiled_decode(decoder, latents, 512)
    assert latents.shape == (1, 32, 192, 192) and tiled.shape == (1, 3, 1536, 1536)
    assert (tiled - reference).abs().max().item() <= 1e-5
    print(f"taef2 768x768 encode + 1536x1536 untiled and tiled decodes: {time.perf_counter() - start:.1f} s")


def test_seam_measure():
    """fastdec.bench.tiling's seam ratio: 1 for an image without seams, > 1 for a brightness step at a border."""
    from fastdec.bench.tiling import diffusers_borders, seam_ratio

    smooth = torch.linspace(0, 1, 64).repeat(1, 3, 64, 1)  # the same horizontal gradient everywhere
    assert seam_ratio(smooth, [], [16, 32]) == pytest.approx(1.0, rel=1e-4)
    stepped = smooth.clone()
    stepped[..., 32:, :] += 0.2  # a seam between rows 31 and 32
    assert seam_ratio(stepped + torch.rand(1, 3, 64, 64) * 0.01, [32], []) > 10
    assert diffusers_borders(256) == [96, 192]


@torch.no_grad()
def test_a_reshape_that_copies_a_held_slab_waits_for_copies_in_flight():
    """From a GPU, slabs reach host memory by non-blocking copies: host code that reads a held slab (a reshape that
    cannot be a view) must wait for them first; one that is a view must not."""
    class Recording(HostTiles):
        waits = 0

        def settle(self):
            self.waits += 1

    x = torch.randn(1, 4, 6, 5)
    run = TiledRun(Recording("cpu"), 6, even_bounds(6, 2))
    with run:
        slab = run.scatter(x, run.latent_bounds, 2)
        viewed = slab.reshape(1, 2, 2, 6, 5)  # a view of each held slab: no wait
        assert run.executor.waits == 0
        copied = slab.permute(0, 1, 3, 2).reshape(1, 20, 6)  # merges two axes a permute made non-adjacent: a copy
    assert run.executor.waits >= 1
    assert torch.equal(run.executor.gather(copied), x.permute(0, 1, 3, 2).reshape(1, 20, 6))
    assert torch.equal(run.executor.gather(viewed), x.reshape(1, 2, 2, 6, 5))
