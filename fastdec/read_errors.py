"""Why a weights or latents file could not be read, in one clean line.

torch.load's weights_only errors carry ANSI escapes, span several lines and advise re-running with
``weights_only=False``, which is the wrong advice here: fastdec never unpickles arbitrary objects (that can run code).
"""

from __future__ import annotations

import pickle
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Sentences of torch.load's message that point to weights_only=False or to allowlisting code: dropped.
_UNSAFE_ADVICE = ("weights_only` set to `False`", "weights_only=False", "two options", "Do it only if you got the file",
                  "In PyTorch 2.6", "Alternatively, to load with", "Please use `torch.serialization",
                  "Please file an issue", "Check the documentation of torch.load")

REFUSED_PICKLE_ADVICE = (
    "it holds pickled Python objects besides tensors, which fastdec never unpickles (that could run code); if you "
    "trust the file, save its tensors again as .safetensors or as a plain state dict (torch.save of tensors only)"
)


def read_error_reason(error: BaseException) -> str:
    """``error``'s message as one line: ANSI escapes stripped, torch.load's unsafe advice dropped."""
    text = _ANSI.sub("", str(error))
    kept = []
    for line in text.splitlines():
        for sentence in re.split(r"(?<=[.:])\s+(?=[A-Z(])", line.strip()):
            sentence = re.sub(r"^\(\d\)\s*", "", sentence.strip())
            if sentence and not any(phrase in sentence for phrase in _UNSAFE_ADVICE):
                kept.append(sentence)
    return " ".join(kept) or type(error).__name__


def is_refused_pickle(error: BaseException) -> bool:
    """torch.load(weights_only=True) refused a pickled Python object (a global), as opposed to unreadable bytes."""
    return isinstance(error, pickle.UnpicklingError) and "GLOBAL" in str(error)


def read_error_advice(error: BaseException, otherwise: str) -> str:
    """What to do: for a refused pickle, REFUSED_PICKLE_ADVICE; else ``otherwise`` (e.g. re-download it)."""
    return REFUSED_PICKLE_ADVICE if is_refused_pickle(error) else otherwise
