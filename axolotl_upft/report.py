"""What a UPFT run produced: the sample summary, the prepared rows' token counts, the outputs."""

import json
from pathlib import Path

from .args import DEFAULT_PREPARED_PATH, UPFTConfig
from .rows import IGNORE_INDEX


def newest(paths) -> Path | None:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else None


def run_report(raw: dict) -> dict:
    from datasets import load_from_disk

    upft = UPFTConfig.from_cfg(raw)
    prepared_root = Path(raw.get("dataset_prepared_path") or DEFAULT_PREPARED_PATH)
    cache_root = upft.sample_cache_root(raw)
    report: dict = {"samples_dir": None, "sampling": None, "prepared_dir": None}
    summary = newest(cache_root.glob("*/summary.json"))
    if summary:
        report["samples_dir"] = str(summary.parent)
        report["sampling"] = json.loads(summary.read_text())
    prepared = newest(p.parent for p in prepared_root.glob("*/dataset_info.json"))
    if prepared:
        rows = load_from_disk(str(prepared))
        trained = [sum(label != IGNORE_INDEX for label in labels) for labels in rows["labels"]]
        report["prepared_dir"] = str(prepared)
        report["rows"] = len(rows)
        report["tokens"] = sum(map(len, rows["input_ids"]))
        report["tokens_trained"] = sum(trained)
    output = Path(raw.get("output_dir") or "outputs")
    report["output_dir"] = str(output)
    report["outputs"] = sorted(p.name for p in output.iterdir()) if output.exists() else []
    return report
