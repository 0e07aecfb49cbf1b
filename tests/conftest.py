"""Fixtures shared by the test modules."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from fastdec import ops

LAUNCHERS = tuple((ops.OP_MODULES[name], f"{name}_triton") for name in ops.TRITON_OPS)


@pytest.fixture
def triton_launches(monkeypatch) -> collections.Counter:
    """Counts calls of each Triton launcher by name: proof that a fused path ran the kernels, not the references."""
    counts: collections.Counter = collections.Counter()

    def counting(name, launch):
        def counted(*args, **kwargs):
            counts[name] += 1
            return launch(*args, **kwargs)

        return counted

    for module, name in LAUNCHERS:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return counts


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """No test reaches the network or a real cache: Hub offline, empty Hub cache, empty FASTDEC_HOME (returned)."""
    import huggingface_hub.constants

    from fastdec import api

    home = tmp_path / "fastdec_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FASTDEC_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    api._cached_decoder.cache_clear()
    yield home
    api._cached_decoder.cache_clear()


@pytest.fixture
def decoder_dir(tmp_path) -> Path:
    """A saved TAESD decoder with two stages (x2 upsampling): cheap to run."""
    from helpers import save_tiny_taesd

    return save_tiny_taesd(tmp_path / "decoder")


@pytest.fixture
def pipe(pipeline):
    """The module's ``pipeline`` fixture with its own VAE back in place, unswapped, after each test."""
    from fastdec.diffusers import unswap_vae

    original = pipeline.vae
    yield pipeline
    pipeline.vae = original
    unswap_vae(pipeline)


@pytest.fixture(scope="module")
def batch_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(folder of 40 small latent files and 3 bad ones, tiny saved TAESD decoder): helpers.make_latent_dataset."""
    from helpers import make_latent_dataset

    return make_latent_dataset(tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def batch_local_run(batch_dataset, tmp_path_factory) -> Path:
    """The output folder of one uninterrupted local ``fastdec batch`` run over batch_dataset (batch size 3)."""
    from helpers import BATCH_FAILED, BATCH_ITEMS

    from fastdec.batch import decode_dataset

    folder, decoder = batch_dataset
    out = tmp_path_factory.mktemp("local") / "out"
    report = decode_dataset(folder, out, str(decoder), batch_size=3, progress=False)
    assert (report.done, report.skipped, report.failed) == (BATCH_ITEMS, 0, len(BATCH_FAILED))
    return out
