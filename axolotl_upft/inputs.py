"""A run's local inputs, checked before Axolotl or `datasets` read them: JSON Lines files of questions (the
`type: upft` datasets and eval's benchmarks) and the sample folder. Errors name the file and the line."""

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from .args import UPFTConfig, upft_dataset_entries
from .cache import check_writable

JSON_SUFFIXES = (".jsonl", ".json")
ROW_EXAMPLE = '{"question": "..."}'


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line; bytes that are not UTF-8 stop with the file and the line named."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}: line {number} is not UTF-8 text (byte {raw[err.start]:#04x} at column "
                    f"{err.start + 1}); save the file as UTF-8, or fix or remove that line"
                ) from None


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of every non-blank line; a line that is not UTF-8, not JSON or not an object
    stops with the file and the line named."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"is not JSON ({err})"
        else:
            if isinstance(row, dict):
                yield number, row
                continue
            problem = f"is a JSON {type(row).__name__}, not an object such as {ROW_EXAMPLE}"
        raise ValueError(f"{path}: line {number} {problem}; each line holds one row: fix or remove that line")


def read_rows(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` rows of a JSON Lines file (all when None), blank lines skipped."""
    rows = [row for _, row in islice(jsonl_rows(path), limit)]
    if not rows:
        raise ValueError(f"{path} holds no rows; write one JSON object per line, such as {ROW_EXAMPLE}")
    return rows


def check_data_file(path: Path) -> None:
    """A local JSON file, read as `datasets` will read it: JSON Lines, or one JSON document (a list of rows)
    spread over several lines when its first line is not a row by itself."""
    count = 0
    try:
        for count, _ in enumerate(jsonl_rows(path), 1):
            pass
    except ValueError:
        if count or not _starts_a_document(path):
            raise
        _check_document(path)
        return
    if not count:
        read_rows(path)  # an empty file: the words eval uses


def _starts_a_document(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4096).lstrip()[:1] in (b"[", b"{")


def _check_document(path: Path) -> None:
    """A file that is one JSON document: a non-empty list of objects (or an object, which `datasets` reads
    as columns)."""
    try:
        rows = json.loads("".join(line for _, line in text_lines(path)))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: line {err.lineno}, column {err.colno} is not JSON ({err.msg}); fix that line"
        ) from None
    if isinstance(rows, list) and (not rows or not all(isinstance(row, dict) for row in rows)):
        raise ValueError(f"{path}: the list must hold one JSON object per row, such as {ROW_EXAMPLE}")


def local_data_files(ds_cfg: dict) -> list[Path]:
    """The local JSON files `datasets` will read for one dataset entry: its `path` (a file, or a folder's
    `data_files` or JSON files) when it exists here; a hub id or a `save_to_disk` folder gives none."""
    path = Path(ds_cfg["path"])
    if path.is_file():
        return [path] if path.suffix in JSON_SUFFIXES or ds_cfg.get("ds_type") == "json" else []
    if not path.is_dir() or (path / "state.json").exists():
        return []
    files = ds_cfg.get("data_files")
    if files:
        found = [Path(f) for f in ([files] if isinstance(files, str) else files)]
        return [f for f in found if f.is_file() and f.suffix in JSON_SUFFIXES]
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix in JSON_SUFFIXES
        and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )


def check_inputs(cfg) -> None:
    """Before Axolotl loads anything: every local JSON file of a `type: upft` dataset reads as rows, and the
    sample folder can be made (one that exists is checked for writing once the run knows it must write)."""
    datasets = upft_dataset_entries(cfg)
    for ds_cfg in datasets:
        for path in local_data_files(ds_cfg):
            check_data_file(path)
    if datasets:
        root = UPFTConfig.from_cfg(cfg).sample_cache_root(cfg)
        if not root.is_dir():
            check_writable(root, "upft.cache_dir")
