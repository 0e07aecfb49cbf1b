"""Training checkpoints: one file, written atomically, read with torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch

from fastdec.files import write_atomically

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes ``state`` to a temporary file, fsyncs it and renames it over ``path``: a run killed while saving
    leaves the previous checkpoint intact."""
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def checkpoint_path(resume: str | Path) -> Path:
    """The checkpoint a ``--resume`` argument names: a checkpoint file, or a run's output folder holding one."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume {resume}: no checkpoint at {path}; pass a run's output folder or its {CHECKPOINT_NAME}"
        )
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"could not read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0]}): it is not a "
            "fastdec training checkpoint"
        ) from error
    if not isinstance(state, dict) or "step" not in state or "student" not in state:
        raise ValueError(f"{path} is not a fastdec training checkpoint (no 'step' and 'student' entries)")
    return state


def check_same_student(state: dict, student_class: str, student_config: dict, path: Path) -> None:
    """A checkpoint of another architecture (class or config) cannot be resumed into this student."""
    saved = (state.get("student_class"), state.get("student_config"))
    if saved != (student_class, student_config):
        raise ValueError(
            f"--resume {path} holds a {saved[0]} with config {saved[1]}, but this run trains a {student_class} with "
            f"config {student_config}: resume with the same --decoder and options, or start a new output folder"
        )
