"""Sample cache: generated token ids on disk, keyed by everything that changes them.

Layout of one run, `<cache_dir>/<key>/`:
  meta.json          what the key was made of (for people; written first)
  part-<hash>-<n>.jsonl  one finished part of n questions: a header line (with the rank that wrote it),
                     then one record per question
  summary.json       written last: its presence means every question has its sample
  rank-<r>.alive     rewritten by rank r while it samples under torchrun, removed when it is done
Every file is written to a temp name and renamed, so a killed run leaves only whole files.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMAT = "axolotl-upft-samples/1"
TMP_PREFIX = ".tmp-"
UNKNOWN_RANK = -1  # tokens_by_rank's key for part files written before headers named their rank
# Beside the weights, what shapes a model's prompts and ids: configs, chat templates (transformers saves
# them as chat_template.jinja), sentencepiece / tiktoken vocabularies and BPE merges.
MODEL_FILES = ("*.json", "*.jinja", "additional_chat_templates/*.jinja", "*.model", "*.tiktoken", "*.txt")
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # weights as transformers and PEFT save them, sharded or not


def digest(value) -> str:
    """Stable sha256 over a JSON-able value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()[:16]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model or adapter folder; .safetensors when there are any, else .bin."""
    files = sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def check_writable(folder: Path, key: str) -> None:
    """Refuse, before any work, a folder (set by `key`) that cannot take new files: a file in its place or
    above it, or a read-only disk or folder. The first write would fail with an OSError naming no setting."""
    chain = [folder, *folder.parents]
    blocker = next((p for p in chain if p.exists() and not p.is_dir()), None)
    existing = next(p for p in chain if p.is_dir())
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is read-only"
    else:
        return
    raise ValueError(
        f"{key}: cannot keep samples in {folder}: {reason}. Set {key} to a folder this run can write to "
        "(it is created if missing), or make that one writable."
    )


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Record:
    index: int
    kind: str
    prompt_digest: str
    ids: list[int]
    stopped: bool


class SampleCache:
    """One run's samples: which questions are done, and atomic writes of new batches."""

    def __init__(self, root: str | os.PathLike, key: str, meta: dict):
        self.key = key
        self.dir = Path(root) / key[:16]
        self.meta = meta
        self.rank = 0  # the rank this process writes part files as (generate_all sets it)

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    def is_complete(self) -> bool:
        return self.summary_path.exists()

    def open(self) -> None:
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            found = self._read_json(meta_path)
            if found.get("key") != self.key:
                raise RuntimeError(
                    f"{meta_path} belongs to another sampling run (key {found.get('key')!r}, expected "
                    f"{self.key!r}). Point upft.cache_dir elsewhere or delete {self.dir}."
                )
        else:
            atomic_write_text(
                meta_path, json.dumps({"format": FORMAT, "key": self.key, **self.meta}, indent=2)
            )

    def load(self) -> dict[int, Record]:
        records: dict[int, Record] = {}
        if not self.dir.exists():
            return records
        for path in sorted(self.dir.glob("part-*.jsonl")):
            for record in self._read_part(path)[1]:
                records.setdefault(record.index, record)
        return records

    def part_path(self, indices: list[int]) -> Path:
        """The part file of one batch, named by its requests, so a rank knows which files others owe it."""
        return self.dir / f"part-{digest(sorted(indices))[:20]}-{len(indices)}.jsonl"

    def heartbeat_path(self, rank: int) -> Path:
        return self.dir / f"rank-{rank}.alive"

    def write_part(self, records: list[Record]) -> Path:
        header = {"format": FORMAT, "key": self.key, "count": len(records), "rank": self.rank}
        lines = [json.dumps(header)]
        lines += [
            json.dumps({"i": r.index, "kind": r.kind, "q": r.prompt_digest, "ids": r.ids, "stop": r.stopped})
            for r in records
        ]
        path = self.part_path([r.index for r in records])
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path

    def count_done(self) -> int:
        """Questions sampled so far by any rank, read from the file names alone."""
        return sum(int(p.stem.rsplit("-", 1)[1]) for p in self.dir.glob("part-*.jsonl"))

    def tokens_by_rank(self) -> dict[int, int]:
        """Generated tokens per rank that wrote them, from the part files' headers (UNKNOWN_RANK for files
        of older runs): how evenly the ranks shared the work."""
        tokens: dict[int, int] = {}
        for path in sorted(self.dir.glob("part-*.jsonl")):
            header, records = self._read_part(path)
            rank = header.get("rank", UNKNOWN_RANK)
            tokens[rank] = tokens.get(rank, 0) + sum(len(r.ids) for r in records)
        return tokens

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, json.dumps({"key": self.key, **summary}, indent=2))

    def _read_json(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RuntimeError(
                f"{path} is corrupt ({err}). Delete it; its samples will be redrawn."
            ) from None

    def _read_part(self, path: Path) -> tuple[dict, list[Record]]:
        try:
            lines = path.read_text().splitlines()
            header = json.loads(lines[0]) if lines else {}
            rows = [json.loads(line) for line in lines[1:]]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RuntimeError(
                f"{path} is corrupt ({err}). Delete it; its samples will be redrawn."
            ) from None
        if header.get("format") != FORMAT or header.get("key") != self.key:
            raise RuntimeError(
                f"{path} is not a sample file of this run (header {header!r}, expected key {self.key!r}). "
                f"Remove it from {self.dir}."
            )
        if header.get("count") != len(rows):
            raise RuntimeError(
                f"{path} holds {len(rows)} records but says {header.get('count')}. "
                "Delete it; its samples will be redrawn."
            )
        try:
            return header, [Record(r["i"], r["kind"], r["q"], r["ids"], r["stop"]) for r in rows]
        except KeyError as err:
            raise RuntimeError(
                f"{path}: a record lacks {err}. Delete it; its samples will be redrawn."
            ) from None


def hub_revision(name: str) -> str:
    """The commit a hub model id resolves to now: the snapshot folder of its config.json (online/cached)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name, "config.json")).parent.name


def model_fingerprint(base_model: str) -> dict:
    """Identity of a model without reading its weights: a folder's weight, config, tokenizer and template
    files (names, sizes, dates), or a hub id with the revision it resolves to."""
    path = Path(base_model)
    if not path.is_dir():
        return {"name": base_model, "revision": hub_revision(base_model)}
    files = sorted({*weight_files(path), *(p for pattern in MODEL_FILES for p in path.glob(pattern))})
    return {
        "path": str(path.resolve()),
        "files": [[p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }
