"""``swap_vae`` / ``unswap_vae``: the pipeline's own VAE object decodes through fastdec, and stays itself.

``pipe.vae`` is not replaced. Its instance gets three attributes that shadow its class's methods, and one that holds
the swap; its modules, parameters, buffers, config and class are untouched, so ``state_dict``, ``save_pretrained``,
``isinstance`` checks, ``fuse_qkv_projections``, ``enable_tiling``/``enable_slicing`` and ``encode`` are diffusers'
own:

* ``decode``: the ``FastdecVAE``'s (fastdec.diffusers.adapter), with the class's signature, wrapped in diffusers'
  ``apply_forward_hook`` as the class's is, so that accelerate's offload hooks fire;
* ``_apply`` (what ``.to()``, ``.half()``, ``.cuda()`` call): the class's, then the same conversion of the fastdec
  decoder's own tensors, so that they follow the VAE;
* ``save_pretrained``: the class's (the original VAE, byte for byte), and a warning that the swap is not saved;
* ``_fastdec_swap``: the ``FastdecVAE`` (a plain attribute, not a submodule: nothing of it is in ``state_dict``).

``SharedWeights``: the fastdec decoder's tensors that equal a tensor of the VAE's decoder under the same name (an
exact decoder's, all of them) are made that very tensor (the VAE's Parameter object), so the pipeline holds one
copy of the decoder's weights, and a ``.to()`` moves and casts both.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from fastdec.api import load
from fastdec.diffusers.adapter import FastdecVAE
from fastdec.models import registry
from fastdec.models.base import Decoder
from fastdec.models.layers import UpsampleConv

logger = logging.getLogger("fastdec")
STATE = "_fastdec_swap"  # the VAE instance's attribute holding its FastdecVAE
_PATCHED = ("decode", "_apply", "save_pretrained")


def swap_vae(pipe, decoder, force_upcast: bool | None = None) -> FastdecVAE:
    """Makes ``pipe.vae`` decode with a fastdec decoder; returns its ``FastdecVAE``. ``pipe.vae`` stays the same
    diffusers VAE object (see the module docstring); ``unswap_vae(pipe)`` undoes it, and swapping a swapped VAE
    replaces the earlier swap.

    ``decoder``: a fastdec Decoder, or anything ``fastdec.load`` takes (e.g. "taesdxl", or ``pipe.vae`` itself for
    the exact decoder). It is moved to the VAE's device and dtype, put in eval mode, and from then on follows the
    VAE's ``.to()``; its tensors equal to the VAE's become the VAE's. It must decode the VAE's latent space and
    upsample by the pipeline's ``vae_scale_factor`` (checked with a 2x2 latent). ``force_upcast`` sets the returned
    FastdecVAE's config only: the pipeline reads its VAE's own config, which the swap leaves as it is.
    """
    vae = pipe.vae
    if vae is None:
        raise ValueError("the pipeline has no VAE to swap (pipe.vae is None)")
    if isinstance(vae, FastdecVAE):
        raise TypeError(
            "pipe.vae is a FastdecVAE: swap_vae keeps the pipeline's own diffusers VAE in place; put it back first "
            "(pipe.vae = pipe.vae.original), then swap"
        )
    adapters = sorted({name.split(".")[0] for name, module in vae.named_modules()
                       if type(module).__module__.startswith("peft.") and not name.startswith("encoder")})
    if adapters:
        raise ValueError(
            f"the pipeline's {type(vae).__name__} has LoRA/PEFT adapters ({', '.join(adapters)}), which fastdec's "
            "decoder would not apply: fuse them into the weights first (pipe.fuse_lora(components=['vae']), then "
            "pipe.unload_lora_weights()), then swap"
        )
    device, dtype = _place_of(vae)
    decoder = load(decoder, device=device, dtype=dtype)  # a Decoder: moved and cast in place
    adapter = FastdecVAE(vae, decoder, force_upcast)
    expected, factor = _expected_upsampling(pipe, vae), adapter.upsampling
    if factor != expected:
        raise ValueError(
            f"{type(decoder).__name__} upsamples latents {factor}x but the pipeline expects its VAE to upsample "
            f"{expected}x (vae_scale_factor): use a decoder with the pipeline's upsampling"
        )
    unswap_vae(pipe)
    adapter.weights = SharedWeights(vae, decoder)
    _install(vae, adapter)
    return adapter


def _expected_upsampling(pipe, vae: nn.Module) -> int:
    """The pipeline's ``vae_scale_factor`` (``vae_scale_factor_spatial``: video pipelines), else the VAE's own
    (``spatial_compression_ratio``: DC-AE, Wan, Qwen-Image; else from its up blocks)."""
    config = vae.config
    blocks = config.get("decoder_block_out_channels") or config.get("block_out_channels")
    found = (getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
             or getattr(vae, "spatial_compression_ratio", None)
             or (blocks and config.get("upsampling_scaling_factor", 2) ** (len(blocks) - 1)))
    if not found:
        raise ValueError(
            f"cannot tell how much the pipeline's {type(vae).__name__} upsamples: set pipe.vae_scale_factor"
        )
    return int(found)


def unswap_vae(pipe) -> nn.Module | None:
    """Undoes ``swap_vae``: ``pipe.vae`` decodes with its own decoder again, exactly as before the swap (the
    instance attributes the swap added are removed; its weights were never changed). Returns ``pipe.vae``; a VAE
    that is not swapped is left as it is."""
    vae = getattr(pipe, "vae", None)
    if vae is not None and STATE in vae.__dict__:
        for name in (*_PATCHED, STATE):
            vae.__dict__.pop(name, None)
    return vae


def swapped(vae: nn.Module) -> FastdecVAE | None:
    """The FastdecVAE that decodes for ``vae`` (a pipeline's VAE), or None when it is not swapped."""
    return vae.__dict__.get(STATE) if isinstance(vae, nn.Module) else None


def weight_bytes(pipe) -> int:
    """Bytes of the parameters and buffers of the pipeline's modules and of the fastdec decoders swapped into them,
    each storage counted once (meta tensors, which hold nothing, not at all): what they hold on their devices."""
    components = getattr(pipe, "components", None) or {"vae": pipe.vae}
    modules = [module for module in components.values() if isinstance(module, nn.Module)]
    modules += [adapter.decoder for adapter in map(swapped, list(modules)) if adapter is not None]
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if not tensor.is_meta:
                storage = tensor.untyped_storage()
                storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


# --- the decoder's tensors that are the VAE's -----------------------------------------------------------------------

Entry = tuple[nn.Module, str, str]  # (module, name, "p" for a parameter or "b" for a buffer)


def _table(entry: Entry) -> dict:
    module, _, kind = entry
    return module._parameters if kind == "p" else module._buffers


class SharedWeights:
    """The fastdec decoder's tensors that are the VAE's (``shared``: pairs of entries) and its own (``own``).

    A shared tensor is the VAE's Parameter (or buffer) object itself: ``.to()`` converts a Parameter in place, so
    both see it; buffers and accelerate's offloading replace objects, so ``rebind`` (before each decode and after
    each ``.to()``) makes the decoder's entries the VAE's current ones again. ``own`` tensors (a tiny decoder's, or
    an exact decoder's latent statistics) are converted along with the VAE (``apply_own``).
    """

    def __init__(self, vae: nn.Module, decoder: Decoder):
        self.vae = vae
        vae_entries = {_key(prefix, name): (module, name, kind)
                       for prefix, module in vae.named_modules() for name, kind in _names(module)}
        rename = registry.vae_key_maps().get(type(vae).__name__, lambda name: name)
        self.shared: list[tuple[Entry, Entry]] = []
        self.own: list[Entry] = []
        for prefix, module in decoder.named_modules():
            for name, kind in _names(module):
                mine = (module, name, kind)
                theirs = vae_entries.get(rename(_key(prefix, name)))
                if theirs is not None and theirs[2] == kind and _same(_table(mine)[name], _table(theirs)[theirs[1]]):
                    self.shared.append((mine, theirs))
                else:
                    self.own.append(mine)
        for module in decoder.modules():
            if isinstance(module, UpsampleConv) and any(entry[0] is module for entry, _ in self.shared):
                module.cache_folded = False  # its folded kernels would be a second copy of the VAE's weights
        self.rebind()

    def rebind(self) -> None:
        """The decoder's shared entries := the VAE's current tensor objects."""
        for mine, theirs in self.shared:
            _table(mine)[mine[1]] = _table(theirs)[theirs[1]]

    def apply_own(self, convert: Callable[[Tensor], Tensor]) -> None:
        """``convert`` (a ``Module._apply`` function: .to(), .half(), ...) on the decoder's own tensors; Parameters
        keep their objects, as ``Module._apply`` does."""
        with torch.no_grad():
            for entry in self.own:
                table, name = _table(entry), entry[1]
                tensor = table[name]
                converted = convert(tensor)
                if converted is tensor:
                    continue
                if entry[2] == "p":
                    tensor.data = converted
                else:
                    table[name] = converted

    def offloaded(self) -> bool:
        """True when accelerate keeps the VAE's weights off the device between forwards (sequential CPU offload)."""
        return getattr(self.vae, "_hf_hook", None) is not None and any(True for _ in self._offload_hooks())

    def run_offloaded(self, run: Callable[[], Tensor]) -> Tensor:
        """``run()`` with the VAE's offloaded decoder weights on the execution device (loaded by the hooks of the
        modules that hold them, for the whole decode) and the decoder's own tensors there too; everything goes
        back where it was afterwards."""
        hooks = list(self._offload_hooks())
        holders = {id(theirs[0]) for _, theirs in self.shared}
        loading = [(module, hook) for module, hook in hooks if id(module) in holders]
        device = hooks[0][1].execution_device
        for module, hook in loading:
            hook.pre_forward(module)
        self.rebind()
        places = [_table(entry)[entry[1]].device for entry in self.own]
        self.apply_own(lambda tensor: tensor.to(device))
        try:
            return run()
        finally:
            for module, hook in loading:
                hook.post_forward(module, None)
            self.rebind()
            back = iter(places)
            self.apply_own(lambda tensor: tensor.to(next(back)))

    def _offload_hooks(self) -> Iterator[tuple[nn.Module, object]]:
        """(module, hook) for each module of the VAE with an accelerate hook that offloads its weights."""
        for module in self.vae.modules():
            hook = getattr(module, "_hf_hook", None)
            for part in getattr(hook, "hooks", (hook,)):
                if getattr(part, "offload", False):
                    yield module, part


def _names(module: nn.Module) -> Iterator[tuple[str, str]]:
    """(name, kind) of a module's own parameters ("p") and buffers ("b") that are set."""
    yield from ((name, "p") for name, value in module._parameters.items() if value is not None)
    yield from ((name, "b") for name, value in module._buffers.items() if value is not None)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _same(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype, device and values (a meta tensor holds none to compare)."""
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and not a.is_meta
            and torch.equal(a, b))


# --- the VAE instance's patched methods -------------------------------------------------------------------------------


def _place_of(vae: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the VAE's floating-point weights; refuses weights on the meta device."""
    tensors = [t for t in (*vae.parameters(), *vae.buffers()) if t.is_floating_point()]
    if not tensors:
        raise ValueError(f"the pipeline's {type(vae).__name__} has no weights to decode with")
    if any(t.is_meta for t in tensors):
        raise ValueError(
            f"the pipeline's {type(vae).__name__} has weights on the meta device (sequential CPU offload, or a "
            "model loaded without weights): swap_vae before pipe.enable_sequential_cpu_offload(), or call "
            "pipe.remove_all_hooks() and pipe.to(device) first"
        )
    return tensors[0].device, tensors[0].dtype


def _install(vae: nn.Module, adapter: FastdecVAE) -> None:
    """Sets the instance attributes of the module docstring."""
    from diffusers.utils.accelerate_utils import apply_forward_hook

    cls = type(vae)
    signature = inspect.signature(cls.decode)
    parameters = [p for p in signature.parameters.values() if p.name != "self"]
    names = tuple(p.name for p in parameters)
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}

    def decode(self, *args, **kwargs):
        if len(args) > len(names) or any(name not in names for name in kwargs):
            raise TypeError(f"{cls.__name__}.decode takes {', '.join(names)}; got {len(args)} positional arguments "
                            f"and {', '.join(kwargs) or 'no keywords'}")
        values = {**defaults, **dict(zip(names[:len(args)], args, strict=True)), **kwargs}
        if names[0] not in values or (names.count("num_frames") and "num_frames" not in values):
            raise TypeError(f"{cls.__name__}.decode is missing an argument: it takes {', '.join(names)}")
        return self.__dict__[STATE].decode(values[names[0]], return_dict=values.get("return_dict", True),
                                           num_frames=values.get("num_frames"))

    decode = functools.wraps(cls.decode)(apply_forward_hook(decode))
    decode.__signature__ = signature

    def _apply(self, fn, recurse=True):
        cls._apply(self, fn, recurse)
        weights = self.__dict__[STATE].weights
        weights.rebind()
        weights.apply_own(fn)
        return self

    @functools.wraps(cls.save_pretrained)
    def save_pretrained(self, *args, **kwargs):
        decoder = self.__dict__[STATE].decoder
        logger.warning(
            "fastdec: %s is saved as the original diffusers VAE; its swap to fastdec's %s is not saved: after "
            "loading, re-apply it with fastdec.diffusers.swap_vae(pipe, decoder)", cls.__name__, type(decoder).__name__,
        )
        return cls.save_pretrained(self, *args, **kwargs)

    vae.__dict__[STATE] = adapter
    vae.__dict__["decode"] = types.MethodType(decode, vae)
    vae.__dict__["_apply"] = types.MethodType(_apply, vae)
    vae.__dict__["save_pretrained"] = types.MethodType(save_pretrained, vae)
