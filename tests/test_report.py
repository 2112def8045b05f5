"""`axolotl-upft report`: where a run's samples, prepared rows and outputs went, with token counts."""

import json
import os

from datasets import Dataset

from axolotl_upft.report import run_report


def write_summary(folder, summary: dict, mtime: int):
    folder.mkdir(parents=True)
    path = folder / "summary.json"
    path.write_text(json.dumps(summary))
    os.utime(path, (mtime, mtime))


def test_report_takes_the_newest_samples_and_rows_and_counts_only_trained_labels(tmp_path):
    prepared, out = tmp_path / "prepared", tmp_path / "out"
    write_summary(prepared / "upft_samples" / "old", {"questions": 1}, mtime=1_000)
    write_summary(prepared / "upft_samples" / "new", {"questions": 2}, mtime=2_000)
    # two prepared datasets: the report must read the newer one
    Dataset.from_dict({"input_ids": [[9]], "labels": [[9]]}).save_to_disk(str(prepared / "older"))
    os.utime(prepared / "older" / "dataset_info.json", (1_000, 1_000))
    rows = {"input_ids": [[1, 2, 3, 4], [5, 6]], "labels": [[-100, -100, 3, 4], [-100, 6]]}
    Dataset.from_dict(rows).save_to_disk(str(prepared / "newer"))
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"")

    report = run_report({"dataset_prepared_path": str(prepared), "output_dir": str(out)})

    assert report == {
        "samples_dir": str(prepared / "upft_samples" / "new"),
        "sampling": {"questions": 2},
        "prepared_dir": str(prepared / "newer"),
        "rows": 2,
        "tokens": 6,
        "tokens_trained": 3,
        "output_dir": str(out),
        "outputs": ["adapter_model.safetensors"],
    }


def test_report_looks_in_upft_cache_dir_and_says_none_where_nothing_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {"upft": {"cache_dir": str(tmp_path / "samples")}}
    assert run_report(raw) == {
        "samples_dir": None,
        "sampling": None,
        "prepared_dir": None,
        "output_dir": "outputs",
        "outputs": [],
    }
    write_summary(tmp_path / "samples" / "key", {"questions": 3}, mtime=1_000)
    write_summary(tmp_path / "last_run_prepared" / "upft_samples" / "key", {"questions": 4}, mtime=2_000)
    assert run_report(raw)["sampling"] == {"questions": 3}, "upft.cache_dir wins over the default folder"
    assert run_report({})["sampling"] == {"questions": 4}, "Axolotl's default dataset_prepared_path"
