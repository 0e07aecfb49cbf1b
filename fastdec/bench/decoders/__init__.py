"""The decoders ``fastdec bench`` runs: every module here defines ``ENTRIES`` (a tuple of ``BenchDecoder``).

Add a decoder by adding a module (one family per file, like taesd.py); nothing else needs editing. The default
``--decoders`` list is every entry, sorted by ``order``, then module name, then position in ``ENTRIES``.
"""

from __future__ import annotations

import importlib
import pkgutil

from fastdec.bench.spec import BenchDecoder, Goal


def _discover() -> dict[str, BenchDecoder]:
    found: list[tuple[int, str, int, BenchDecoder]] = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        entries = getattr(module, "ENTRIES", None)
        if entries is None:
            raise ImportError(f"{module.__name__} defines no ENTRIES: every module in fastdec/bench/decoders/ "
                              "lists its BenchDecoder entries in ENTRIES")
        found += [(entry.order, module_info.name, index, entry) for index, entry in enumerate(entries)]
    registry: dict[str, BenchDecoder] = {}
    for *_, entry in sorted(found, key=lambda item: item[:3]):
        if entry.name in registry:
            raise ImportError(f"two fastdec bench entries are named {entry.name!r}")
        registry[entry.name] = entry
    return registry


ENTRIES: dict[str, BenchDecoder] = _discover()
DECODERS: tuple[str, ...] = tuple(ENTRIES)
DEFAULT_DECODERS: tuple[str, ...] = tuple(name for name, entry in ENTRIES.items() if entry.default)
# --quick: one decoder of each kind (exact image VAE, tiny image decoder, paper decoder, exact video VAE, tiny video)
QUICK_DECODERS: tuple[str, ...] = tuple(name for name, entry in ENTRIES.items() if entry.quick)
# Replacements for the SD VAE: decoders of SD's 4-channel latents other than the exact path.
LIGHTWEIGHT: tuple[str, ...] = tuple(name for name, entry in ENTRIES.items() if entry.lightweight)
GPU_GOALS: tuple[Goal, ...] = tuple(goal for entry in ENTRIES.values() for goal in entry.goals)
