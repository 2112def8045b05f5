"""The sample cache: sample once, invalidate on any change, resume after a crash, refuse foreign files."""

import json

import pytest
from axolotl.utils.dict import DictDefault

from axolotl_upft import generation
from axolotl_upft.args import UPFTConfig
from axolotl_upft.dataset import build_rows


@pytest.fixture
def counted(monkeypatch):
    """Counts the questions each generate_batch call samples; optionally crashes after N batches."""
    state = {"questions": 0, "batches": 0, "crash_after": None}
    real = generation.generate_batch

    def generate(model, prompts, **kwargs):
        if state["crash_after"] is not None and state["batches"] >= state["crash_after"]:
            raise KeyboardInterrupt("simulated crash")
        state["batches"] += 1
        state["questions"] += len(prompts)
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", generate)
    return state


def run(questions, model, tokenizer, cache, **upft):
    upft = {
        "prefix_length": 4,
        "structure_ratio": 0.25,
        "sampling": {"max_new_tokens": 12, "batch_size": 4},
    } | upft
    cfg = DictDefault({"base_model": str(model), "sequence_len": 256})
    return build_rows(questions[:16], tokenizer, cfg, UPFTConfig(cache_dir=str(cache), **upft))


def test_second_run_samples_nothing_and_builds_the_same_rows(
    questions, tiny_model, tiny_tokenizer, tmp_path, counted
):
    first = run(questions, tiny_model, tiny_tokenizer, tmp_path)
    assert counted["questions"] == 16
    second = run(questions, tiny_model, tiny_tokenizer, tmp_path)
    assert counted["questions"] == 16
    assert second == first


@pytest.mark.parametrize(
    "change",
    [
        {"prefix_length": 5},
        {"structure_ratio": 0.5},
        {"seed": 7},
        {"question_template": "{question} Answer ."},
        {"system_prompt": "You are a careful math tutor ."},
        {"sampling": {"max_new_tokens": 12, "batch_size": 4, "temperature": 0.9}},
        {"sampling": {"max_new_tokens": 13, "batch_size": 4}},
    ],
)
def test_any_setting_that_changes_samples_starts_a_new_cache(
    change, questions, tiny_model, tiny_tokenizer, tmp_path, counted
):
    run(questions, tiny_model, tiny_tokenizer, tmp_path)
    run(questions, tiny_model, tiny_tokenizer, tmp_path, **change)
    assert counted["questions"] == 32
    assert len(list(tmp_path.iterdir())) == 2


def test_a_new_draw_version_of_the_sampler_starts_a_new_cache(
    questions, tiny_model, tiny_tokenizer, tmp_path, counted, monkeypatch
):
    run(questions, tiny_model, tiny_tokenizer, tmp_path)
    run(questions, tiny_model, tiny_tokenizer, tmp_path)
    assert counted["questions"] == 16
    monkeypatch.setattr(generation, "DRAW_VERSION", generation.DRAW_VERSION + 1)
    run(questions, tiny_model, tiny_tokenizer, tmp_path)
    assert counted["questions"] == 32
    assert len(list(tmp_path.iterdir())) == 2


def test_settings_that_only_shape_rows_reuse_the_samples(
    questions, tiny_model, tiny_tokenizer, tmp_path, counted
):
    run(questions, tiny_model, tiny_tokenizer, tmp_path)
    rows = run(questions, tiny_model, tiny_tokenizer, tmp_path, prefix_eos=False, prefix_instruction=None)
    assert counted["questions"] == 16
    assert all(
        r.input_ids[-1] != tiny_tokenizer.eos_token_id
        for r in rows
        if r.kind == "prefix" and r.num_trained == 4
    )


def test_interrupted_run_resumes_with_the_missing_questions_only(
    questions, tiny_model, tiny_tokenizer, tmp_path, counted
):
    # batch size 1: the hf backend gets calls of generation.POOL questions, so 16 questions are 4 calls
    sampling = {"sampling": {"max_new_tokens": 12, "batch_size": 1}}
    reference = run(questions, tiny_model, tiny_tokenizer, tmp_path / "reference", **sampling)
    counted.update(questions=0, batches=0, crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        run(questions, tiny_model, tiny_tokenizer, tmp_path / "crashed", **sampling)
    assert counted["questions"] == 8
    counted.update(questions=0, batches=0, crash_after=None)
    resumed = run(questions, tiny_model, tiny_tokenizer, tmp_path / "crashed", **sampling)
    assert counted["questions"] == 8
    assert resumed == reference, "same seed per batch: a resumed run draws exactly the uninterrupted samples"


def test_a_corrupt_or_foreign_file_in_the_cache_is_an_error_never_reused(
    questions, tiny_model, tiny_tokenizer, tmp_path, counted
):
    run(questions, tiny_model, tiny_tokenizer, tmp_path)
    (run_dir,) = tmp_path.iterdir()
    part = min(run_dir.glob("part-*.jsonl"))
    part.write_text(part.read_text()[:-20])
    with pytest.raises(RuntimeError, match=f"{part.name} is corrupt.*Delete it"):
        run(questions, tiny_model, tiny_tokenizer, tmp_path)
    header = {"format": "axolotl-upft-samples/1", "key": "someone-else", "count": 0}
    part.write_text(json.dumps(header) + "\n")
    with pytest.raises(RuntimeError, match="not a sample file of this run"):
        run(questions, tiny_model, tiny_tokenizer, tmp_path)


def test_summary_counts_questions_kinds_and_tokens(questions, tiny_model, tiny_tokenizer, tmp_path, counted):
    run(questions, tiny_model, tiny_tokenizer, tmp_path)
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [
        json.loads(line) for p in run_dir.glob("part-*.jsonl") for line in p.read_text().splitlines()[1:]
    ]
    assert (summary["questions"], summary["prefix"], summary["full"]) == (16, 12, 4)
    assert summary["tokens_generated"] == sum(len(r["ids"]) for r in records)
    assert all(len(r["ids"]) <= 4 for r in records if r["kind"] == "prefix")
