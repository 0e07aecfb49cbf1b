"""Layers more than one decoder family shares.

``UpsampleConv`` is "nearest x2 upsample, then a 3x3 conv (padding 1)" computed without materialising the upsampled
input: each of the four output phases (a, b) = (row parity, column parity) of the upsampled conv only ever reads a
2x2 neighbourhood of the low-resolution input, so the 3x3 taps that land on the same input pixel are summed into
one 2x2 kernel per phase. One 2x2 conv with 4x the output channels over the input (padding 1) then yields all
phases, and ``ops.pixel_shuffle(., 2, phase_offset=1)`` interleaves them: 4x fewer multiply-adds than the conv at
full resolution, and no upsampled tensor in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdec import ops
from fastdec.kernels.group_norm_act import group_moments, group_norm_act_given_stats, merge_group_moments


def _fold_taps(weight: Tensor, dim: int) -> Tensor:
    """3 taps along ``dim`` -> 2 taps per phase, phases stacked in a new leading dim.

    Output row 2i + a of the upsampled conv reads input rows i - 1 + a + dy (dy in {0, 1}); tap k reads upsampled
    row 2i + a + k - 1, which is input row i - 1 for (a=0, k=0), row i for (a=0, k=1..2) and (a=1, k=0..1), and
    row i + 1 for (a=1, k=2).
    """
    k0, k1, k2 = weight.unbind(dim)
    return torch.stack([torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)])


def fold_upsample_conv3x3(weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(O, C, 3, 3) conv weight after a nearest x2 upsample -> the (4*O, C, 2, 2) phase kernels and their bias.

    Output channel o*4 + a*2 + b holds phase (a, b) of channel o, the order ``ops.pixel_shuffle(., 2, 1)`` reads.
    Taps are summed in fp32 (fp64 stays fp64) and cast back to the weight's dtype once.
    """
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"fold_upsample_conv3x3 needs a (O, C, 3, 3) conv weight, got shape {tuple(weight.shape)}")
    out_channels, in_channels = weight.shape[:2]
    rows = _fold_taps(weight.to(torch.promote_types(weight.dtype, torch.float32)), 2)  # (a, O, C, dy, kx)
    phases = _fold_taps(rows, 4)  # (b, a, O, C, dy, dx)
    folded = phases.permute(2, 1, 0, 3, 4, 5).reshape(out_channels * 4, in_channels, 2, 2).to(weight.dtype)
    return folded, None if bias is None else bias.repeat_interleave(4)


def norm_act(norm: nn.GroupNorm, x: Tensor, act: str) -> Tensor:
    """``act(norm(x))`` as one fused ``ops.group_norm_act``; ``norm`` only holds the parameters (diffusers' keys)."""
    return ops.group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, act)


# A norm + conv (or a folded upsampler) making at least this many bytes runs in row chunks of about a quarter of it.
CHUNKED_BYTES = 512 << 20


def norm_act_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: Tensor, act: str) -> Tensor:
    """``conv(act(norm(x)))``. From CHUNKED_BYTES of input (``chunked``: a 3x3 conv with padding 1), the normalized
    input is made and convolved a few rows at a time, with statistics over all of x, so that x, its normalized copy
    and the conv's output are never all held at once: at 1024^2 bf16, the last SD-VAE up block's first resnet held
    1280 MiB that way (its 512 MiB input twice, conv1's output)."""
    if not (chunked(x, x.nbytes) and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros"):
        normalized = norm_act(norm, x, act)
        del x  # a caller that hands over its only reference (a conv's output) frees it before the conv runs
        return conv(normalized)
    batch, groups = x.shape[0], norm.num_groups
    mean, var = merge_group_moments([group_moments(x, groups)], x[0].numel() // groups, batch, groups, x.device)
    out = None
    for top, bottom, low, high in row_chunks(x.shape[-2], x.nbytes):
        # one expression, so that no chunk's temporaries outlive it
        out = into_rows(out, conv(group_norm_act_given_stats(
            x[..., low:high, :], groups, norm.weight, norm.bias, norm.eps, act, mean, var
        )).narrow(-2, top - low, bottom - top), top, x.shape[-2], x)
    return out


def chunked(x: Tensor, nbytes: int) -> bool:
    """Whether a layer making ``nbytes`` from ``x`` runs in row chunks: not for the tensor subclasses of tiling and
    FakeTensorMode (whole tensors only), nor where autograd or torch.compile would have to see through the chunks,
    nor on the meta device (no memory to save; tiling's planner runs whole decodes there)."""
    return (type(x) is Tensor and x.dim() == 4 and nbytes >= CHUNKED_BYTES and x.device.type != "meta"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def row_chunks(rows: int, nbytes: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, low, high) of each chunk of rows top:bottom (``nbytes`` for all rows split into pieces of at
    most a quarter of CHUNKED_BYTES), low:high adding one neighbour row each side inside the image."""
    step = math.ceil(rows / math.ceil(nbytes / (CHUNKED_BYTES // 4)))
    return [(top, min(top + step, rows), max(top - 1, 0), min(top + step + 1, rows)) for top in range(0, rows, step)]


def suggested_format(x: Tensor) -> torch.memory_format:
    """channels_last for a channels_last tensor that is not also plain contiguous, else contiguous_format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def into_rows(out: Tensor | None, chunk: Tensor, top: int, rows: int, like: Tensor) -> Tensor:
    """Writes ``chunk`` at row ``top`` of ``out``: a tensor of ``rows`` rows in the memory layout of ``like`` (the
    layer's input, whose layout a conv keeps), made by the first chunk (``out`` None)."""
    if out is None:
        out = torch.empty((*chunk.shape[:2], rows, chunk.shape[-1]), dtype=chunk.dtype, device=chunk.device,
                          memory_format=suggested_format(like))
    out[..., top:top + chunk.shape[-2], :] = chunk
    return out


class UpsampleConv(nn.Module):
    """nn.Upsample(scale_factor=2) followed by nn.Conv2d(in, out, 3, padding=1), run as one folded 2x2 conv.

    Holds the original 3x3 ``weight`` and ``bias`` (state-dict keys as nn.Conv2d's), so checkpoints load unchanged.
    ``cache_folded`` False folds on every call instead of keeping the folded kernels (1.8x the weights) between
    calls: fastdec.diffusers.swap_vae sets it where the weights are the diffusers VAE's, so that one copy is kept.
    """

    cache_folded: bool = True

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # nn.Conv2d's default initialisation, so a freshly built model matches one built from nn.Conv2d.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._folded: tuple | None = None  # (parameter key, folded kernels), see folded()
        if self.bias is not None:
            bound = 1 / math.sqrt(in_channels * 9)
            nn.init.uniform_(self.bias, -bound, bound)

    def folded(self) -> tuple[Tensor, Tensor | None]:
        """The 2x2 phase kernels. Folded on every call while training or compiling (the fold is then part of the
        graph, differentiable and fused); in inference they are cached, keyed on the parameters' storage and
        version counters, which every in-place update, load_state_dict and .to() changes."""
        params = [p for p in (self.weight, self.bias) if p is not None]
        if not self.cache_folded or torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p.requires_grad for p in params)
        ):
            return fold_upsample_conv3x3(self.weight, self.bias)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, fold_upsample_conv3x3(self.weight, self.bias))
        return self._folded[1]

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.folded()
        made = x.nbytes * weight.shape[0] // weight.shape[1]  # by the conv, and as much by the shuffle
        if not chunked(x, made):
            return ops.pixel_shuffle(F.conv2d(x, weight, bias, padding=1), 2, phase_offset=1)
        # Output rows 2i, 2i + 1 interleave conv rows i and i + 1, and conv row i reads input rows i - 1 and i.
        out, rows = None, x.shape[-2]
        for top, bottom, low, high in row_chunks(rows, made):
            phases = F.conv2d(x[..., low:high, :], weight, bias, padding=1).narrow(-2, top - low, bottom - top + 1)
            out = into_rows(out, ops.pixel_shuffle(phases, 2, phase_offset=1), 2 * top, 2 * rows, x)
            del phases  # before the next chunk's conv
        return out

    def extra_repr(self) -> str:
        out_channels, in_channels = self.weight.shape[:2]
        return f"{in_channels}, {out_channels}, bias={self.bias is not None}"


class ChannelConstants:
    """Per-channel constants kept as Python numbers (a model's config) and handed out as device tensors built once
    per (dtype, device, ndim): a decode then makes no host-to-device copy (pageable, and not allowed inside CUDA
    graph capture) for them. Not module buffers, so that ``.to(bfloat16)`` does not round values applied in fp32."""

    def __init__(self, values) -> None:
        self.values = [float(v) for v in values]
        self._tensors: dict[tuple, Tensor] = {}

    def get(self, dtype: torch.dtype, device: torch.device, ndim: int) -> Tensor:
        """(1, C, 1, ...) with ``ndim`` dims, to broadcast against (N, C, ...) tensors."""
        key = (dtype, torch.device(device), ndim)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.values, dtype=dtype, device=device).view(1, -1, *(1,) * (ndim - 2))
        return self._tensors[key]
