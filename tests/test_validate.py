"""One latent check for every entry point (fastdec.validate.check_latents): ``Decoder.decode`` of every decoder
family refuses what ``fastdec.decode`` refuses, with the same message; the NaN/Inf check runs in eager use, can be
turned off, and is skipped under torch.compile, where ``fastdec.decode`` compiles as one graph with no break (no
value read back to the host) and, on a GPU, is captured in a CUDA graph."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from helpers import compile_fullgraph

import fastdec
import fastdec.models
from fastdec.models import dcae, layers
from fastdec.models.autoencoder_kl import AutoencoderKLDecoder
from fastdec.models.base import Decoder
from fastdec.models.dcae import DCAEDecoder
from fastdec.models.flux2 import Flux2VAEDecoder
from fastdec.models.taesd import TAESDDecoder
from fastdec.models.vit import ViTDecoder
from fastdec.validate import CHECK_FINITE_ENV

# One tiny decoder per image family on main (decode of a 4x4 latent: milliseconds) and its latent channels.
FAMILIES = {
    "taesd": (lambda: TAESDDecoder(variant="taesd", blocks=(1, 1)), 4),
    "autoencoder_kl": (lambda: AutoencoderKLDecoder(block_out_channels=(16, 32), layers_per_block=1,
                                                    norm_num_groups=8, latent_channels=4), 4),
    "dcae": (lambda: DCAEDecoder(**dict(dcae.PRESETS["efficientvit"][1], block_out_channels=(8, 8, 8, 16, 16, 16),
                                        layers_per_block=(0, 1, 1, 0, 0, 0)), latent_channels=4), 4),
    "vit": (lambda: ViTDecoder(dim=32, depth=1, num_heads=2, latent_patch=2, latent_channels=4), 4),
    "flux2": (lambda: Flux2VAEDecoder(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1), 32),
}


def build(family: str) -> Decoder:
    torch.manual_seed(0)
    return FAMILIES[family][0]().eval()


def good_latents(*shape: int, channels: int = 4) -> torch.Tensor:
    return torch.randn(*(shape or (1, channels, 4, 4)), generator=torch.Generator().manual_seed(1))


def poisoned(value: float, channels: int = 4) -> torch.Tensor:
    latents = good_latents(channels=channels)
    latents[0, 2, 1, 3] = value
    return latents


def bad_cases(c: int) -> dict:
    """Bad latents for a decoder of c-channel latents: (make, error type, message pattern)."""
    return {
        "nan": (lambda: poisoned(float("nan"), c), ValueError, "latents contain NaN or Inf.*check_finite=False"),
        "inf": (lambda: poisoned(float("inf"), c), ValueError, "latents contain NaN or Inf"),
        "-inf": (lambda: poisoned(-float("inf"), c), ValueError, "latents contain NaN or Inf"),
        "int64": (lambda: torch.ones(1, c, 4, 4, dtype=torch.int64), TypeError, "float tensor, got torch.int64"),
        "rank3": (lambda: good_latents(c, 4, 4), ValueError,
                  rf"expects latents shaped \(B, C, h, w\), got shape \({c}, 4, 4\): add the batch axis"),
        "meta": (lambda: torch.empty(1, c, 4, 4, device="meta"), ValueError, "meta device and hold no values"),
        "height 0": (lambda: good_latents(1, c, 0, 8), ValueError, rf"\(1, {c}, 0, 8\) are empty \(height is 0\)"),
        "width 0": (lambda: good_latents(1, c, 8, 0), ValueError, r"empty \(width is 0\)"),
        "batch 0": (lambda: good_latents(0, c, 4, 4), ValueError, r"empty \(batch is 0\)"),
        "channels": (lambda: good_latents(1, 5, 4, 4), ValueError, f"latents have 5 channels but .* expects {c}"),
    }


@pytest.fixture(scope="module")
def decoders() -> dict[str, Decoder]:
    return {family: build(family) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_decode_refuses_bad_latents_like_fastdec_decode(decoders, family):
    decoder, channels = decoders[family], FAMILIES[family][1]
    for case, (make, error, message) in bad_cases(channels).items():
        with pytest.raises(error, match=message):
            decoder.decode(make())
        if case != "rank3":  # fastdec.decode takes unbatched (C, h, w) latents
            with pytest.raises(error, match=message):
                fastdec.decode(make(), decoder)
    assert decoder.decode(good_latents(channels=channels)).shape[:2] == (1, 3)


def test_nan_check_can_be_turned_off(decoders, monkeypatch):
    decoder = decoders["taesd"]
    with torch.no_grad():
        assert decoder.decode(poisoned(float("nan")), check_finite=False).isnan().any()
        monkeypatch.setenv(CHECK_FINITE_ENV, "0")
        assert decoder.decode(poisoned(float("nan"))).isnan().any()
        assert fastdec.decode(poisoned(float("nan")), decoder).isnan().any()
        with pytest.raises(ValueError, match="NaN or Inf"):  # an explicit True wins over the environment
            decoder.decode(poisoned(float("nan")), check_finite=True)


def _decode_overrides() -> list[tuple[type[Decoder], object]]:
    """(class, method) for every Decoder that overrides what first sees the latents: decode itself, or the
    contract's ``prepare`` (families' other input forms, e.g. FLUX.2's packed latents and tokens)."""
    for module in pkgutil.iter_modules(fastdec.models.__path__):
        importlib.import_module(f"fastdec.models.{module.name}")
    found, pending = [], list(Decoder.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if "decode" in vars(cls):
            found.append((cls, cls.decode))
        elif cls.prepare is not Decoder.prepare:
            found.append((cls, cls.prepare))
    return found


def _runs_the_check(function, depth: int = 2) -> bool:
    """``function`` calls check_latents or the base decode, itself or through a fastdec helper it calls by name."""
    source = inspect.getsource(function)
    if "check_latents(" in source or "super().decode(" in source:
        return True
    helpers = (function.__globals__.get(name) for name in function.__code__.co_names)
    return depth > 0 and any(inspect.isfunction(helper) and helper.__module__.startswith("fastdec.")
                             and _runs_the_check(helper, depth - 1) for helper in helpers)


def test_every_decode_override_runs_the_latent_check():
    """A family that overrides Decoder.decode (video decoders, packed latents, ...) must run check_latents first;
    families that land later are covered by this test without edits."""
    overrides = _decode_overrides()
    assert len(overrides) >= 2  # the test sees the families (EfficientViT-style and video overrides)
    for cls, method in overrides:
        assert _runs_the_check(method), f"{cls.__module__}.{cls.__name__}.decode never calls check_latents"
        assert "check_finite" in inspect.signature(method).parameters, f"{cls.__name__}.decode: no check_finite"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fastdec_decode_compiles_as_one_graph(decoders, family):
    """torch.compile(lambda z: fastdec.decode(z, decoder=d), fullgraph=True): one graph, no break (a value read back
    to the host would break it), same output as eager."""
    decoder = decoders[family]
    latents = good_latents(channels=FAMILIES[family][1])
    compiled, eager = compile_fullgraph(lambda z: fastdec.decode(z, decoder=decoder), latents)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_decode_skips_the_nan_check(decoders):
    """Under torch.compile the NaN/Inf check is skipped (documented): NaN flows to the output, eager still refuses."""
    decoder = decoders["taesd"]
    torch._dynamo.reset()
    compiled = torch.compile(lambda z: fastdec.decode(z, decoder=decoder), fullgraph=True, backend="eager")
    assert compiled(poisoned(float("nan"))).isnan().any()
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastdec.decode(poisoned(float("nan")), decoder)


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_in_row_chunks_equals_the_whole(family, monkeypatch):
    """The row chunks of large decodes (models.layers.CHUNKED_BYTES), taken at every layer that has them."""
    decoder, channels = build(family), FAMILIES[family][1]
    latents = good_latents(channels=channels)
    whole = fastdec.decode(latents, decoder=decoder)
    monkeypatch.setattr(layers, "CHUNKED_BYTES", 1024)
    torch.testing.assert_close(fastdec.decode(latents, decoder=decoder), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU (none here)")
@pytest.mark.parametrize("row_chunks", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fastdec_decode_is_captured_in_a_cuda_graph(family, row_chunks, monkeypatch):
    """No host synchronisation during capture (a sync would make capture fail) and replay matches eager; also with
    the row chunks of large decodes (models.layers.CHUNKED_BYTES) taken at every layer that has them."""
    if row_chunks:
        monkeypatch.setattr(layers, "CHUNKED_BYTES", 1024)
    decoder, channels = build(family).cuda(), FAMILIES[family][1]
    static = good_latents(channels=channels).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: Triton compiles, cuDNN picks algorithms
        for _ in range(2):
            fastdec.decode(static, decoder=decoder)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fastdec.decode(static, decoder=decoder)
    fresh = good_latents(channels=channels).cuda() * 0.5
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, fastdec.decode(fresh, decoder=decoder), rtol=1e-4, atol=1e-4)
