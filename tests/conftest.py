"""Fixtures shared by the test modules."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from fastdec.kernels import attention, group_norm_act, patch_unembed, rms_norm_act

LAUNCHERS = ((group_norm_act, "group_norm_act_triton"), (attention, "attention_triton"),
             (patch_unembed, "patch_unembed_triton"), (rms_norm_act, "rms_norm_act_triton"))


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
    import huggingface_hub

    from fastdec import api

    home = tmp_path / "fastdec_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FASTDEC_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    api._cached_decoder.cache_clear()
    yield home
    api._cached_decoder.cache_clear()
