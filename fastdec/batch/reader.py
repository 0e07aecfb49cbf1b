"""What a batch job reads: the sources of an input (latent files or Parquet row groups) and the work units in them.

Both engines decode the same units, formed by ``read_source`` alone: a unit is a run of consecutive latents of one
shape from one source, at most ``batch_size`` long. A file holding a batch of B <= batch_size latents is one unit,
decoded as ``fastdec decode`` decodes that file, so the outputs are the same bytes; and since the units never depend
on the engine, the local and the Ray engine write the same bytes too (a CPU or GPU convolution may round an item
differently in another batch composition, so the composition is fixed here, once).

Parquet schema (one row per latent; ``write_parquet`` writes it):

==========  ==============  ==========================================================================================
column      Arrow type      meaning
==========  ==============  ==========================================================================================
``id``      string          unique, names the output (``<id>.png``): letters, digits, ``.``, ``_``, ``-``
``latent``  binary          the tensor's raw bytes, C order, little-endian
``shape``   list<int64>     (C, h, w) for an image latent, (C, T, h, w) for a video latent
``dtype``   string          float32, float16 or bfloat16
==========  ==============  ==========================================================================================
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fastdec.latents_io import LATENT_SUFFIXES, read_latents

SEVERAL_ADVICE = "fastdec batch reads one tensor per file: save one latent or one batch per file (or decode this " \
                 "file with fastdec decode --key NAME)"

PARQUET_COLUMNS = ("id", "latent", "shape", "dtype")
PARQUET_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ID_PATTERN = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")
IMAGE_NDIM, VIDEO_NDIM = 3, 4  # one latent, unbatched: (C, h, w) or (C, T, h, w)


@dataclass(frozen=True)
class Source:
    """A unit of reading: a latent file, or one row group of a Parquet file."""

    path: str
    row_group: int | None = None  # Parquet only

    def to_json(self) -> str:
        return json.dumps([self.path, self.row_group])

    @classmethod
    def from_json(cls, text: str) -> Source:
        return cls(*json.loads(text))

    @property
    def name(self) -> str:
        return Path(self.path).name if self.row_group is None else f"{Path(self.path).name}#row-group-{self.row_group}"


@dataclass
class Unit:
    """Latents of one shape decoded as one batch: ``latents`` (B, *shape) with ``ids[i]`` naming item i; or a read
    failure (``error``), ``ids`` then naming what could not be read (a file stem, or Parquet row ids)."""

    ids: list[str]
    latents: Tensor | None = None
    error: str | None = None
    read_seconds: float = field(default=0.0, compare=False)


def list_sources(input_path: str | Path) -> tuple[list[Source], str]:
    """The sources of an input and its kind ("files" or "parquet"): a folder of latent files (.safetensors, .pt,
    .pth, .npy, .npz; not recursive), a .parquet file, or a folder of .parquet files. Sorted by name."""
    path = Path(input_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input {path} not found: pass a folder of latent files or a Parquet file/folder")
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ValueError(
                f"input {path} is a single file: pass the folder holding the latent files (for one file use "
                "`fastdec decode`), or a .parquet file"
            )
        return _parquet_sources([path]), "parquet"
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    parquet = [p for p in files if p.suffix.lower() == ".parquet"]
    latents = [p for p in files if p.suffix.lower() in LATENT_SUFFIXES]
    if parquet and latents:
        raise ValueError(f"{path} holds both .parquet and latent files: put them in separate folders")
    if parquet:
        return _parquet_sources(parquet), "parquet"
    if not latents:
        raise ValueError(f"{path} holds no latent files ({', '.join(LATENT_SUFFIXES)}) and no .parquet files")
    stems: dict[str, Path] = {}
    for file in latents:
        if file.stem in stems:
            raise ValueError(f"{stems[file.stem].name} and {file.name} would write the same outputs: rename one")
        if not ID_PATTERN.fullmatch(file.stem):
            raise ValueError(f"{file.name}: output names come from file names; use letters, digits, '.', '_', '-'")
        stems[file.stem] = file
    return [Source(str(file)) for file in latents], "files"


def _parquet_sources(files: list[Path]) -> list[Source]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(f"Parquet input needs pyarrow ({error}): pip install pyarrow") from error

    sources = []
    for file in files:
        metadata = pq.ParquetFile(file).metadata
        sources += [Source(str(file), index) for index in range(metadata.num_row_groups)]
    return sources


def count_items(source: Source) -> int | None:
    """How many latents a source holds, from headers where possible (progress totals); None when unreadable."""
    try:
        if source.row_group is not None:
            import pyarrow.parquet as pq

            return pq.ParquetFile(source.path).metadata.row_group(source.row_group).num_rows
        path = Path(source.path)
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                shapes = [handle.get_slice(key).get_shape() for key in handle.keys()]  # noqa: SIM118
            shape = shapes[0] if len(shapes) == 1 else None
        elif suffix == ".npy":
            import numpy as np

            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        elif suffix in (".pt", ".pth"):  # memory-mapped: the header, not the data
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            tensors = list(content.values()) if isinstance(content, dict) else [content]
            shape = tensors[0].shape if len(tensors) == 1 and isinstance(tensors[0], Tensor) else None
        else:  # .npz: no cheap header
            shape = read_latents(path, several=SEVERAL_ADVICE).shape
        # one image latent (C, h, w), or a batch: (B, C, h, w) images, (B, C, T, h, w) videos
        return None if shape is None else 1 if len(shape) == IMAGE_NDIM else shape[0]
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is read, not counted here
        return None


def read_source(source: Source, batch_size: int) -> list[Unit]:
    """The units of a source; a source that cannot be read, or holds something that is not latents, gives one
    failed unit with the reason (the job goes on)."""
    import time

    start = time.perf_counter()
    units = _read_parquet(source, batch_size) if source.row_group is not None else _read_file(source, batch_size)
    seconds = (time.perf_counter() - start) / max(1, len(units))
    for unit in units:
        unit.read_seconds = seconds
    return units


def _read_file(source: Source, batch_size: int) -> list[Unit]:
    path = Path(source.path)
    try:
        latents = read_latents(path, several=SEVERAL_ADVICE)
    except (ValueError, TypeError, OSError) as error:
        return [Unit([path.stem], error=str(error))]
    if latents.dim() == IMAGE_NDIM:
        latents = latents.unsqueeze(0)
    if latents.dim() not in (IMAGE_NDIM + 1, VIDEO_NDIM + 1):
        return [Unit([path.stem], error=(
            f"{path.name}: latents must be (C, h, w) or (B, C, h, w) for images, (B, C, T, h, w) for video; got "
            f"shape {tuple(latents.shape)}"))]
    # the names `fastdec decode` gives: images <stem>_000, <stem>_001, ...; videos <stem> (one) or <stem>_000, ...
    digits = max(3, len(str(len(latents) - 1))) if latents.dim() == IMAGE_NDIM + 1 else 3
    ids = [f"{path.stem}_{index:0{digits}d}" for index in range(len(latents))]
    if latents.dim() == VIDEO_NDIM + 1 and len(latents) == 1:
        ids = [path.stem]
    return [Unit(ids[i:i + batch_size], latents[i:i + batch_size]) for i in range(0, len(latents), batch_size)]


def _read_parquet(source: Source, batch_size: int) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(source.path).read_row_group(source.row_group, columns=list(PARQUET_COLUMNS))
    except Exception as error:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        return [Unit([source.name], error=f"could not read {source.name} ({type(error).__name__}: {error})")]
    units: list[Unit] = []
    run: list[tuple[str, Tensor]] = []

    def flush() -> None:
        if run:
            units.append(Unit([item_id for item_id, _ in run], torch.stack([latent for _, latent in run])))
            run.clear()

    for row in table.to_pylist():
        item_id = row["id"]
        try:
            latent = _latent_of_row(row)
        except ValueError as error:
            flush()
            units.append(Unit([str(item_id)], error=f"{source.name}: {error}"))
            continue
        if run and (latent.shape != run[0][1].shape or latent.dtype != run[0][1].dtype or len(run) == batch_size):
            flush()
        run.append((item_id, latent))
    flush()
    return units


def _latent_of_row(row: dict) -> Tensor:
    item_id, data, shape, dtype = (row.get(column) for column in PARQUET_COLUMNS)
    if not isinstance(item_id, str) or not ID_PATTERN.fullmatch(item_id):
        raise ValueError(f"row id {item_id!r} is not a valid output name (letters, digits, '.', '_', '-')")
    if dtype not in PARQUET_DTYPES:
        raise ValueError(f"row {item_id!r}: dtype {dtype!r} is not one of {sorted(PARQUET_DTYPES)}")
    if not shape or len(shape) not in (IMAGE_NDIM, VIDEO_NDIM) or any(size is None or size < 0 for size in shape):
        raise ValueError(f"row {item_id!r}: shape {shape} is neither (C, h, w) nor (C, T, h, w)")
    torch_dtype = PARQUET_DTYPES[dtype]
    expected = torch_dtype.itemsize * math.prod(shape)
    if data is None or len(data) != expected:
        got = "no bytes" if data is None else f"{len(data)} bytes"
        raise ValueError(f"row {item_id!r}: shape {shape} in {dtype} needs {expected} bytes, the latent has {got}")
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


def write_parquet(path: str | Path, latents: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                  row_group_size: int = 64) -> Path:
    """Writes latents as a Parquet file in the schema ``fastdec batch`` reads (one row per latent: id, latent bytes,
    shape, dtype). ``latents``: id -> tensor (C, h, w) or (C, T, h, w), float32/float16/bfloat16, or (id, tensor)
    pairs. A row group is the unit of reading (and of Ray tasks); ``row_group_size`` rows each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {column: [] for column in PARQUET_COLUMNS}
    pairs = latents.items() if isinstance(latents, Mapping) else latents
    for item_id, latent in pairs:
        if not ID_PATTERN.fullmatch(str(item_id)):
            raise ValueError(f"id {item_id!r}: ids name output files; use letters, digits, '.', '_', '-'")
        if not isinstance(latent, Tensor) or latent.dim() not in (IMAGE_NDIM, VIDEO_NDIM):
            shape = tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
            raise ValueError(f"id {item_id!r}: expected one latent (C, h, w) or (C, T, h, w), got {shape}")
        dtype = str(latent.dtype).removeprefix("torch.")
        if dtype not in PARQUET_DTYPES:
            raise ValueError(f"id {item_id!r}: dtype {latent.dtype} is not one of {sorted(PARQUET_DTYPES)}; cast it")
        data = latent.detach().cpu().contiguous()
        columns["id"].append(str(item_id))
        columns["latent"].append(data.view(torch.uint8).numpy().tobytes())
        columns["shape"].append(list(data.shape))
        columns["dtype"].append(dtype)
    if len(set(columns["id"])) != len(columns["id"]):
        raise ValueError("ids must be unique: each names one output file")
    schema = pa.schema([("id", pa.string()), ("latent", pa.binary()), ("shape", pa.list_(pa.int64())),
                        ("dtype", pa.string())])
    path = Path(path)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path
