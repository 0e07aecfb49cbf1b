"""Whole decoders, end to end: fastdec (fused ops) vs fastdec on reference ops vs the same architecture in diffusers
eager, on the same weights (random; speed does not depend on their values) and the same random normal latents.

CUDA: 512x512 images, batch 1, bf16, each family. CPU: 32x32 images, fp32, so that the suite runs in CI (with
FASTDEC_TRITON_INTERPRET=1 the fused ops go through Triton's interpreter there: a check that the path runs, not a
speed figure; ``benchmark.extra_info["backend"]`` says which backend ran). Every run also checks the output against
the fp32 reference-ops output and records max |error| and PSNR in ``extra_info``.

Regression workflow: ``pytest bench/ --benchmark-autosave``, then after a change
``pytest bench/ --benchmark-compare --benchmark-compare-fail=mean:10%``. ``fastdec bench`` gives the full picture
(torch.compile variants, memory, sizes, the README table).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastdec import bench, ops

CUDA = torch.cuda.is_available()
SIDE, DTYPE = (512, torch.bfloat16) if CUDA else (32, torch.float32)
BATCH = 1
IMPLS = ("fastdec", "reference", "diffusers")
# Sanity floors for the output against the fp32 reference (parity itself is tested in tests/): fp32 paths agree to
# ~1e-6 of the image range; bf16 rounds every layer's output to 8 mantissa bits.
MIN_PSNR_DB = {torch.float32: 100.0, torch.bfloat16: 25.0}


@pytest.fixture(scope="module")
def cases() -> dict:
    """Per decoder, built once: (fastdec model, diffusers twin or None, latents, fp32 reference image)."""
    built = {}

    def get(name: str):
        if name not in built:
            device = torch.device("cuda" if CUDA else "cpu")
            contender = bench.build_contender(name)
            channels_last = CUDA and contender.channels_last
            latents = bench.latents_for(contender, SIDE, BATCH, seed=0).to(device)
            reference_model = bench.prepare(copy.deepcopy(contender.model), device, torch.float32, channels_last)
            with torch.no_grad(), ops.reference_ops():
                reference = bench.image_of(reference_model(latents), contender.model.output_range)
            model = bench.prepare(contender.model, device, DTYPE, channels_last)
            twin = None if contender.diffusers is None else bench.prepare(contender.diffusers, device, DTYPE, False)
            latents = latents.to(DTYPE)
            if channels_last:
                latents = latents.contiguous(memory_format=torch.channels_last)
            built[name] = (contender, model, twin, latents, reference)
        return built[name]

    return get


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", bench.DECODERS)
def test_decoder(benchmark, measure, device, cases, name, impl):
    contender, model, twin, latents, reference = cases(name)
    if impl == "diffusers" and twin is None:
        pytest.skip(f"{name}: {contender.no_diffusers_reason}")
    benchmark.group = f"decoder {name} {device.type} B={BATCH} {SIDE}x{SIDE} {bench.dtype_name(DTYPE)}"
    if impl == "diffusers":
        output_range = contender.entry.twin_output_range
        backend = f"diffusers {type(twin).__name__}, eager"

        def fn():
            return contender.entry.twin_decode(twin, latents)
    else:
        output_range = model.output_range
        backend = bench.fused_backend(device) if impl == "fastdec" else "eager-reference ops"

        def fn():
            if impl == "reference":
                with ops.reference_ops():
                    return model(latents)
            return model(latents)

    benchmark.extra_info.update(impl=impl, backend=backend)
    with torch.no_grad():
        output = measure(fn, rounds=None if CUDA else 2)

    if impl == "diffusers" and contender.entry.twin_is_other_model:  # e.g. Wan's VAE against taew2_1: timed only
        assert torch.isfinite(output).all(), f"{name} {impl}: non-finite output"
        return
    quality = bench.fidelity(bench.image_of(output, output_range), reference)
    benchmark.extra_info.update(max_abs_error=quality["max_abs_error"], psnr_db=quality["psnr_db"])
    assert quality["finite"], f"{name} {impl}: non-finite output"
    assert quality["psnr_db"] is None or quality["psnr_db"] >= MIN_PSNR_DB[DTYPE], quality
