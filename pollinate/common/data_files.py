"""Rows of a data source: a .json/.jsonl/.csv/.parquet file, a directory of them, a dataset saved with
``save_to_disk``, or a Hugging Face dataset id already in the local Hub cache (runs are offline).

JSONL and CSV are read with the standard library, so values stay exactly as written (CSV cells are strings);
parquet through pyarrow and saved datasets through ``datasets``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pollinate.common.models import HUB_ID, hub_cache_dir

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# What a directory of files contributes: a .json next to data files is usually metadata (e.g. label names).
DIRECTORY_SUFFIXES = (".jsonl", ".csv", ".parquet")
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file/field and what was expected."""


def read_source(source: str) -> tuple[list[dict[str, Any]], str]:
    """Rows of ``source`` (an existing path, else a cached Hub dataset id) and a short name for it."""
    path = Path(source).expanduser()
    if path.exists():
        return read_rows(path), path.stem
    if HUB_ID.match(source):
        return [row for file in cached_hub_dataset(source) for row in read_rows(file)], source.split("/")[-1]
    raise DataError(f"data source '{source}' is neither a built-in task, an existing file or directory, nor a "
                    "Hugging Face dataset id (org/name)")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a data file, of a saved HF dataset directory, or of every data file of a directory (in name
    order: e.g. Dolly, one file per category)."""
    if path.is_dir() and not any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
        files = sorted(p for p in path.iterdir() if p.suffix in DIRECTORY_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"data directory '{path}' holds no {'/'.join(DIRECTORY_SUFFIXES)} file and is not a "
                            "saved dataset")
        return [row for file in files for row in read_rows(file)]
    if path.is_dir():
        return _saved_dataset(path)
    readers = {".jsonl": _json_lines, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    if path.suffix not in readers:
        raise DataError(f"data file '{path}' has an unsupported type; expected {', '.join(DATA_FILE_SUFFIXES)} or "
                        "a saved dataset directory")
    return readers[path.suffix](path)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"'{path}' line {lineno} is not valid JSON: {exc}") from exc
    return rows


def _json(path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects, or JSON lines under a .json name (as ``datasets`` accepts both)."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"'{path}' must hold a JSON array of objects (or one object per line)")
    return data


def _csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _saved_dataset(path: Path) -> list[dict[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return [dict(r) for r in ds]


def cached_hub_dataset(repo_id: str) -> list[Path]:
    """The data files of ``repo_id``'s train split in the local Hub cache, in name order, never
    downloading: its files named or placed under ``train`` when there are any, else all of them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        raise DataError(f"dataset {repo_id!r} is not in the local Hugging Face cache ({cache}) and runs are "
                        f"offline: run `hf download {repo_id} --repo-type dataset` on a machine with internet (then "
                        "copy the cache here, or point HF_HUB_CACHE at it), or set data.source to a local "
                        "file") from exc
    files = sorted(p for p in snapshot.rglob("*") if p.is_file() and (p.suffix in DIRECTORY_SUFFIXES or (
        p.suffix == ".json" and "info" not in p.name and p.name not in SAVED_DATASET_MARKERS)))
    train = [p for p in files if "train" in p.relative_to(snapshot).as_posix().lower()]
    if not files:
        raise DataError(f"dataset {repo_id!r} in the Hugging Face cache ({snapshot}) holds no "
                        f"{'/'.join(DATA_FILE_SUFFIXES)} file")
    return train or files

