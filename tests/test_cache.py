"""The sample cache: sample once, invalidate on any change, resume after a crash, refuse foreign files."""

import json

import pytest
import tiny
from axolotl.utils.dict import DictDefault

from axolotl_upft import generation
from axolotl_upft.args import UPFTConfig
from axolotl_upft.dataset import build_rows
from axolotl_upft.logs import NAMESPACE


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
    cfg = tiny.axolotl_cfg(model)
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
    from axolotl_upft.prompts import chat_messages, render_prompt_ids

    first = run(questions, tiny_model, tiny_tokenizer, tmp_path)
    rows = run(questions, tiny_model, tiny_tokenizer, tmp_path, prefix_eos=False, prefix_instruction=None)
    assert counted["questions"] == 16, "the second run sampled nothing"
    eos, cut = tiny_tokenizer.eos_token_id, 0
    for before, after, question in zip(first, rows, questions[:16]):
        bare = render_prompt_ids(tiny_tokenizer, chat_messages(question["question"], None))
        response = [t for t in before.labels if t != -100]
        if after.kind == "full":
            assert after == before
            continue
        assert len(before.input_ids) - len(response) > len(bare), "the first run's prompt had the instruction"
        if len(response) == 4 + 1 and response[-1] == eos:  # k = 4 generated ids, then prefix_eos's EOS
            response, cut = response[:-1], cut + 1
        assert after.input_ids == bare + response, "instruction null: the bare prompt, the same sample"
        assert after.labels == [-100] * len(bare) + response
    assert cut > 0, "some prefix reached k tokens, so prefix_eos: false shows"


def test_full_trace_modes_share_one_cache_whatever_k_and_p(
    questions, tiny_model, tiny_tokenizer, tmp_path, counted
):
    """sft, rft and label_filter draw one full trace per question alike: k and p do not key those draws."""

    def graded(**upft):  # the random model may solve nothing: then there is nothing to train, after sampling
        try:
            run(questions, tiny_model, tiny_tokenizer, tmp_path, **upft)
        except ValueError as err:
            assert "no question kept a correct sample" in str(err)

    run(questions, tiny_model, tiny_tokenizer, tmp_path, mode="sft")
    graded(mode="rft", num_samples=1, prefix_length=9)
    graded(label_filter=True, num_samples=1, structure_ratio=0.5)
    assert counted["questions"] == 16, "only the first run sampled"
    assert len(list(tmp_path.iterdir())) == 1
    graded(mode="rft", num_samples=2)
    assert counted["questions"] == 48, "two samples per question are other draws"


def test_interrupted_run_resumes_with_the_missing_questions_only(
    questions, tiny_model, tiny_tokenizer, tmp_path, counted
):
    # 12 prefix and 4 full questions, one worker: 4 parts of each kind (PARTS_PER_RANK), the prefix parts of 3
    sampling = {"sampling": {"max_new_tokens": 12, "batch_size": 1}}
    reference = run(questions, tiny_model, tiny_tokenizer, tmp_path / "reference", **sampling)
    counted.update(questions=0, batches=0, crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        run(questions, tiny_model, tiny_tokenizer, tmp_path / "crashed", **sampling)
    assert counted["questions"] == 6
    counted.update(questions=0, batches=0, crash_after=None)
    resumed = run(questions, tiny_model, tiny_tokenizer, tmp_path / "crashed", **sampling)
    assert counted["questions"] == 10
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


def prepared_data_hash(base_model: str) -> str:
    """Axolotl's own prepared-data hash of a `type: upft` config, once the plugin registered on it."""
    from axolotl.utils.data.shared import generate_dataset_hash_from_config

    from axolotl_upft.plugin import UPFTPlugin

    cfg = DictDefault(
        {
            "base_model": base_model,
            "upft": {"prefix_length": 4},
            "datasets": [{"path": "questions.jsonl", "type": "upft"}],
        }
    )
    UPFTPlugin().register(cfg)
    return generate_dataset_hash_from_config(cfg, cfg.datasets, "tokenizer")


def test_weights_changed_in_place_change_the_prepared_data_hash_and_the_sample_cache(
    questions, tiny_model, tiny_tokenizer, tmp_path, counted
):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = prepared_data_hash(str(model))
    assert prepared_data_hash(str(model)) == before, "same files, same hash"
    run(questions, model, tiny_tokenizer, tmp_path / "samples")
    # a second UPFT round saved into the same folder: same names, same sizes, other weights
    trained = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    size = (model / "model.safetensors").stat().st_size
    trained.save_pretrained(model)
    assert (model / "model.safetensors").stat().st_size == size
    assert prepared_data_hash(str(model)) != before, "axolotl train must not reuse rows of the old weights"
    run(questions, model, tiny_tokenizer, tmp_path / "samples")
    assert counted["questions"] == 32, "the sample cache sampled the new weights again"


def fake_hub_snapshot(cache, repo: str, revision: str) -> None:
    """A model in the local hub cache, as a download leaves it: snapshots/<commit>/ and refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / revision).mkdir(parents=True)
    (folder / "snapshots" / revision / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)


def test_a_hub_model_is_keyed_by_the_revision_it_resolves_to(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from axolotl_upft.cache import model_fingerprint

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    old, new = "a" * 40, "b" * 40
    fake_hub_snapshot(tmp_path, "acme/tiny-math", old)
    assert model_fingerprint("acme/tiny-math") == {"name": "acme/tiny-math", "revision": old}
    before = prepared_data_hash("acme/tiny-math")
    fake_hub_snapshot(tmp_path, "acme/tiny-math", new)  # the hub's main moved on; the next download gets it
    assert model_fingerprint("acme/tiny-math")["revision"] == new
    assert prepared_data_hash("acme/tiny-math") != before


def test_generation_config_is_read_from_a_folder_or_the_hub_cache_and_a_failed_read_is_a_warning(
    monkeypatch, tmp_path, caplog
):
    from huggingface_hub import constants

    from axolotl_upft.selfsample import read_generation_config

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "local"
    folder.mkdir()
    assert read_generation_config(str(folder)) == {}, "a folder without the file: no hub call, no warning"
    (folder / "generation_config.json").write_text('{"top_p": 0.8}')
    assert read_generation_config(str(folder)) == {"top_p": 0.8}
    fake_hub_snapshot(tmp_path / "hub", "acme/tiny-math", "c" * 40)
    snapshot = tmp_path / "hub" / "models--acme--tiny-math" / "snapshots" / ("c" * 40)
    (snapshot / "generation_config.json").write_text('{"top_k": 20}')
    assert read_generation_config("acme/tiny-math") == {"top_k": 20}
    with caplog.at_level("INFO", logger=NAMESPACE):
        assert read_generation_config("acme/not-downloaded") == {}
    (warning,) = [r for r in caplog.records if r.name.startswith(NAMESPACE)]
    assert warning.levelname == "WARNING" and "top_p, top_k" in warning.getMessage()
    (folder / "generation_config.json").write_text('{"top_p": ')
    with pytest.raises(json.JSONDecodeError):
        read_generation_config(str(folder))  # a broken file is an error, not "no generation config"


def test_a_new_sample_set_next_to_an_older_one_logs_which_settings_changed(tmp_path, caplog):
    from axolotl_upft.cache import SampleCache
    from axolotl_upft.selfsample import log_why_not_reused

    old = SampleCache(tmp_path, "a" * 64, {"sampling": {"temperature": 0.6, "top_p": 1.0}, "seed": 42})
    old.open()
    new = SampleCache(tmp_path, "b" * 64, {"sampling": {"temperature": 0.7, "top_p": 1.0}, "seed": 42})
    with caplog.at_level("INFO", logger=NAMESPACE):
        log_why_not_reused(new)
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith(NAMESPACE)]
    assert f"samples in {old.dir} were drawn with other settings" in line
    assert "(changed: sampling.temperature)" in line, "only the key that differs is named"
