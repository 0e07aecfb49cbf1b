"""The decoder families: every family registers in fastdec.models.registry and nothing else lists them; one
Decoder.decode contract whose family options are checked by name; models import neither api nor tiling."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import fastdec
from fastdec import api
from fastdec.models import registry
from fastdec.models.base import Decoder
from fastdec.models.taehv import TAEHVDecoder
from fastdec.models.taesd import TAESDDecoder
from fastdec.models.wan import WanDecoder

PACKAGE = Path(fastdec.__file__).resolve().parent
FAMILY_NAMES = {
    "autoencoder_kl": {"sd", "sdxl", "sd3", "flux"},
    "flux2": {"flux2"},
    "dcae": {"dc-ae"},
    "wan": set(),
    "svd": {"svd"},
    "taehv": {"taehv", "taew2_1", "taew2_2", "taehv1_5", "taecvx", "taeltx_2"},
    "taesd": {"taesd", "taesdxl", "taesd3", "taef1", "taef2"},
    "vit": set(),
    "tae_temporal": set(),
    "preview": set(),
}


def test_the_registry_lists_every_family_with_its_names():
    families = {family.name: family for family in registry.families()}
    assert {name: set(family.names) for name, family in families.items()} == FAMILY_NAMES
    assert set(registry.presets()) == {"tae-192", "efficientvit", "efficientvit-attn", "vit-s", "vit-b",
                                       "tae-temporal"}
    assert registry.aliases() == {"sd1": "sd", "sd2": "sd", "flux1": "flux"}
    assert registry.default_decoders(4) == {4: "taesd", 16: "taef1", 32: "taef2"}
    assert registry.default_decoders(5) == {16: "taew2_1", 32: "taehv1_5", 48: "taew2_2", 128: "taeltx_2"}
    assert list(registry.diffusers_readers()) == [
        "AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderDC", "AutoencoderKLWan", "AutoencoderKLQwenImage",
        "AutoencoderKLTemporalDecoder", "AutoencoderTiny"]
    assert set(api.names()) >= {*registry.named(), *registry.aliases(), *registry.presets()}
    # Every concrete Decoder that fastdec.models defines belongs to a family (the two mixins' hosts excepted).
    modules = [importlib.import_module(f"fastdec.models.{module.name}")
               for module in pkgutil.iter_modules([str(PACKAGE / "models")])]
    defined = {cls for module in modules for cls in vars(module).values()
               if inspect.isclass(cls) and issubclass(cls, Decoder) and cls.__module__ == module.__name__}
    built_at_run_time = {"PerFrameVideoDecoder", "PackedLatentsDecoder", "Decoder"}
    assert {cls.__name__ for cls in defined} - built_at_run_time == set(registry.decoder_classes())


def test_a_name_claimed_twice_is_refused():
    with pytest.raises(ImportError, match="registers names \\['taesd'\\] that another family has"):
        registry.register(registry.Family(name="copy", order=0, names={"taesd": registry.Weights()}))
    assert "copy" not in {family.name for family in registry.families()}


def _family_literals(path: Path, family_strings: set[str]) -> list[str]:
    """String constants of ``family_strings`` that sit in a dict, list, tuple or set literal of a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Dict, ast.List, ast.Tuple, ast.Set)):
            items = [*node.keys, *node.values] if isinstance(node, ast.Dict) else node.elts
            found += [f"{path.relative_to(PACKAGE)}:{item.lineno} {item.value!r}" for item in items
                      if isinstance(item, ast.Constant) and item.value in family_strings]
    return found


def test_no_module_outside_the_registry_keeps_a_family_table():
    """api, validate, the CLI, diffusers, video, parallel, ... and train list no decoder names, aliases, presets or
    diffusers decoder classes: the family modules register them. (fastdec/encoders.py names the diffusers VAEs it
    encodes with, which is not a decoder table.)"""
    names = {*registry.named(), *registry.aliases(), *registry.presets()}
    core = [*sorted(PACKAGE.glob("*.py")), *sorted((PACKAGE / "diffusers").glob("*.py"))]
    assert {"api.py", "validate.py", "cli.py", "adapter.py", "swap.py"} <= {path.name for path in core}
    encoders = PACKAGE / "encoders.py"
    hits = [hit for path in core if path != encoders
            for hit in _family_literals(path, names | set(registry.diffusers_readers()))]
    hits += [hit for path in [encoders, *sorted((PACKAGE / "train").glob("*.py"))]
             for hit in _family_literals(path, names)]
    assert hits == []


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_models_and_validate_import_neither_api_nor_tiling():
    """The two circles through the orchestration layer: validate reads the registry, tiling wraps decoders."""
    for path in [*sorted((PACKAGE / "models").glob("*.py")), PACKAGE / "validate.py"]:
        upward = {name for name in _imports(path) if name.startswith(("fastdec.api", "fastdec.tiling"))}
        assert not upward, (path.name, upward)
    assert _imports(PACKAGE / "models" / "registry.py") <= {
        "__future__", "__future__.annotations", "importlib", "pkgutil", "collections.abc",
        "collections.abc.Callable", "collections.abc.Mapping", "dataclasses", "dataclasses.dataclass",
        "dataclasses.field", "pathlib", "pathlib.Path", "typing", "typing.Any"}


@torch.no_grad()
def test_an_option_the_family_does_not_take_is_a_clear_error():
    taesd = TAESDDecoder("taesd", blocks=(1, 1)).eval()
    latents = torch.randn(1, 4, 2, 2)
    with pytest.raises(TypeError, match="TAESDDecoder.decode does not take chunk_frames; it takes: check_finite$"):
        taesd.decode(latents, chunk_frames=2)
    with pytest.raises(TypeError, match="does not take image_size"):
        fastdec.decode(latents, taesd, image_size=(32, 32))
    wan = WanDecoder(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temporal_downsample=[False],
                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    with pytest.raises(TypeError, match="WanDecoder.decode does not take decode_chunk_size, progress; it takes: "
                                        "check_finite, chunk_frames"):
        wan.decode(torch.randn(1, 4, 2, 2, 2), decode_chunk_size=1, progress=print)


@torch.no_grad()
def test_decode_stream_yields_the_decode_in_pieces():
    torch.manual_seed(0)
    taehv = TAEHVDecoder("taew2_1").eval()
    latents = torch.randn(1, 16, 3, 2, 2)
    steps = []
    pieces = list(taehv.decode_stream(latents, progress=lambda done, total: steps.append((done, total)),
                                      chunk_frames=1))
    assert len(pieces) == 3 and steps == [(1, 3), (2, 3), (3, 3)]
    torch.testing.assert_close(torch.cat(pieces, 1), taehv.decode(latents), rtol=1e-5, atol=1e-5)
    taesd = TAESDDecoder("taesd", blocks=(1, 1)).eval()
    image = torch.randn(2, 4, 2, 2)
    assert [piece.shape for piece in taesd.decode_stream(image)] == [(2, 3, 4, 4)]


@pytest.mark.parametrize(("latent_dtype", "decoder_dtype"), [(torch.bfloat16, torch.float32),
                                                             (torch.float32, torch.bfloat16)])
def test_decoder_decode_casts_latents_to_its_dtype_as_fastdec_decode_does(latent_dtype, decoder_dtype):
    """The README's "load once, decode many" with bf16 latents (the real Wan latent is bf16) into an fp32 decoder,
    and fp32 latents into a decoder loaded in a half dtype, decode as fastdec.decode does: no raw dtype error."""
    decoder = TAESDDecoder("taesd").to(decoder_dtype).eval()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(latent_dtype)
    images = decoder.decode(latents)
    assert images.dtype == decoder_dtype and images.shape == (1, 3, 32, 32)
    assert torch.equal(images, fastdec.decode(latents, decoder=decoder))
