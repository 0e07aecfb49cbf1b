"""``--pipeline-share``: one UNet step timed beside the decoders, and the decode's share of a sampling run."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdec.bench.decoders import LIGHTWEIGHT
from fastdec.bench.settings import PIPELINE_STEPS, TEXT_TOKENS, UNET_BLOCKS, UNET_CONFIGS, Settings
from fastdec.bench.timing import calls_per_round, interleaved_times, summary_ms


def unet_step_times(settings: Settings, side: int, batch: int) -> tuple[dict, dict]:
    """One denoiser step of a random-weight UNet2DConditionModel on the CFG batch (2 x batch): (summary, config)."""
    import diffusers

    config = dict(sample_size=side // 8, in_channels=4, out_channels=4, **UNET_CONFIGS[settings.unet_config],
                  **UNET_BLOCKS)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    unet = unet.to_empty(device=settings.device)
    generator = torch.Generator(settings.device).manual_seed(settings.seed)
    with torch.no_grad():
        for tensor in (*unet.parameters(), *unet.buffers()):
            tensor.normal_(0, 0.02, generator=generator)  # values do not change the speed; fast on any device
    unet = unet.to(settings.dtype).eval()
    cfg_batch = 2 * batch
    sample = torch.randn(cfg_batch, 4, side // 8, side // 8, generator=generator, device=settings.device)
    context = torch.randn(cfg_batch, TEXT_TOKENS, config["cross_attention_dim"], generator=generator,
                          device=settings.device)
    sample, context = sample.to(settings.dtype), context.to(settings.dtype)
    timestep = torch.full((cfg_batch,), 500, device=settings.device)

    def step() -> Tensor:
        return unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    with torch.no_grad():
        for _ in range(max(settings.warmup, 1)):
            step()
        calls = calls_per_round(step, settings.device)
        times = interleaved_times({"unet": step}, {"unet": calls}, settings.repeats, settings.device)["unet"]
    described = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    return summary_ms(times), {"name": settings.unet_config, "cfg_batch": cfg_batch, **described}


def pipeline_share(rows: list[dict], settings: Settings, side: int, batch: int) -> dict:
    """The decode's share of a sampling run (steps x UNet step + one decode), without and with fastdec."""
    def median(decoder: str, variant: str) -> float | None:
        row = next((r for r in rows if (r["decoder"], r["variant"], r["resolution"], r["batch"]) ==
                    (decoder, variant, side, batch)), None)
        return None if row is None else row["median_ms"]

    decoders = {"diffusers sd-vae (eager)": ("sd-vae", "diffusers", median("sd-vae", "diffusers")),
                "fastdec sd-vae (exact)": ("sd-vae", "fastdec", median("sd-vae", "fastdec"))}
    lightweight = [(median(name, "fastdec"), name) for name in LIGHTWEIGHT if median(name, "fastdec") is not None]
    if lightweight:
        best_ms, best = min(lightweight)
        decoders[f"fastdec {best} (best lightweight)"] = (best, "fastdec", best_ms)
    decoders = {label: entry for label, entry in decoders.items() if entry[2] is not None}
    unet, unet_config = unet_step_times(settings, side, batch)
    unet_ms = unet["median_ms"]
    baseline = decoders.get("diffusers sd-vae (eager)")
    steps = []
    for count in PIPELINE_STEPS:
        entry = {"steps": count, "total_ms": {}, "decode_share": {}, "speedup_vs_diffusers": {}}
        for label, (_, _, decode_ms) in decoders.items():
            total = count * unet_ms + decode_ms
            entry["total_ms"][label] = total
            entry["decode_share"][label] = decode_ms / total
            if baseline is not None:
                entry["speedup_vs_diffusers"][label] = (count * unet_ms + baseline[2]) / total
        steps.append(entry)
    label = (f"unet config: {unet_config['name']} (block_out_channels {unet_config['block_out_channels']}, "
             f"cross_attention_dim {unet_config['cross_attention_dim']}, batch {unet_config['cfg_batch']} for CFG)")
    if unet_config["name"] != "sd15":
        label += " -- NOT the SD1.5-size UNet: shares are illustrative only"
    return {"resolution": side, "batch": batch, "unet_config": unet_config, "unet_label": label, "unet_step": unet,
            "decoders": {label_: {"decoder": d, "variant": v, "median_ms": ms}
                         for label_, (d, v, ms) in decoders.items()},
            "steps": steps}

