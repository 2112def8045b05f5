"""Evaluation end to end on the tiny random Llama: files, grading, resume, sharding, adapters."""

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from tiny import build_model, gsm8k_questions

from axolotl_upft import evaluate as ev
from axolotl_upft import generation
from axolotl_upft.distributed import Distributed
from axolotl_upft.grading import extract_answer, extract_answer_flexible, gold_answer, is_equivalent

LIMIT = 5
MAX_NEW = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rows = gsm8k_questions(90, "train") + gsm8k_questions(10, "test")
    corpus = [row["question"] + " " + row["answer"] for row in rows] + ["The answer is 18 ."]
    return str(build_model(tmp_path_factory.mktemp("tiny"), corpus))


@pytest.fixture
def calls(monkeypatch):
    """(thread, prompts, rows decoded at a time) of every generate_batch call evaluate makes (real generation
    still runs)."""
    seen = []
    real = generation.generate_batch

    def spy(model, prompts, **kwargs):
        seen.append((threading.current_thread().name, len(prompts), kwargs["running"]))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", spy)
    return seen


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def arm(out, model_dir, adapter=None):
    return out / ev.arm_name(model_dir, adapter)


def run(model_dir, out, **kwargs):
    options = {"limit": LIMIT, "output_dir": out, "max_new_tokens": MAX_NEW, "batch_size": 1, **kwargs}
    return ev.evaluate(model_dir, options.pop("benchmark", "gsm8k"), **options)


def test_eval_writes_graded_rows_summary_and_table_then_a_rerun_generates_nothing(model_dir, tmp_path, calls):
    summary = run(model_dir, tmp_path)

    rows = read_jsonl(arm(tmp_path, model_dir) / "gsm8k.jsonl")
    source = gsm8k_questions(LIMIT, "test")
    assert [r["index"] for r in rows] == list(range(LIMIT))
    assert [r["question"] for r in rows] == [s["question"] for s in source]
    assert [r["gold"] for r in rows] == [gold_answer(s, "gsm8k") for s in source]
    for row in rows:
        assert 1 <= row["tokens"] <= MAX_NEW
        assert row["answer"] == extract_answer(row["prediction"])
        assert row["correct"] == is_equivalent(row["answer"], row["gold"])
        assert row["answer_flexible"] == extract_answer_flexible(row["prediction"])
        assert row["correct_flexible"] == is_equivalent(row["answer_flexible"], row["gold"])
    # The headline number must be the rows' own mean, not a separately kept count.
    assert summary["accuracy"] == round(100 * sum(r["correct"] for r in rows) / LIMIT, 2)
    assert summary["n"] == LIMIT and summary["correct"] == sum(r["correct"] for r in rows)
    assert summary["mean_tokens"] == round(sum(r["tokens"] for r in rows) / LIMIT, 1)
    assert summary["accuracy_flexible"] == round(100 * sum(r["correct_flexible"] for r in rows) / LIMIT, 2)
    assert summary == json.loads((arm(tmp_path, model_dir) / "gsm8k.summary.json").read_text())
    # batch size 1 caps a part at generation.POOL questions; 5 questions make the planner's 4 parts
    # (2 + 1 + 1 + 1), each decoded one row at a time
    assert [(n, running) for _, n, running in calls] == [(2, 1), (1, 1), (1, 1), (1, 1)]
    assert ev.read_results(tmp_path / "results.md") == [
        [
            model_dir,
            "-",
            "gsm8k",
            str(LIMIT),
            f"{summary['accuracy']:.2f}",
            f"{summary['accuracy_flexible']:.2f}",
        ]
    ]

    calls.clear()
    again = run(model_dir, tmp_path)
    assert calls == []
    assert again["tokens_generated_this_run"] == 0
    assert {k: v for k, v in again.items() if k not in ("wall_seconds", "tokens_generated_this_run")} == {
        k: v for k, v in summary.items() if k not in ("wall_seconds", "tokens_generated_this_run")
    }
    assert read_jsonl(arm(tmp_path, model_dir) / "gsm8k.jsonl") == rows
    assert len(ev.read_results(tmp_path / "results.md")) == 1

    # A larger limit reuses the cached questions and generates only the new ones.
    calls.clear()
    assert run(model_dir, tmp_path, limit=LIMIT + 2)["n"] == LIMIT + 2
    assert sum(n for _, n, _ in calls) == 2
    assert ev.read_results(tmp_path / "results.md")[0][3] == str(LIMIT + 2)


def test_a_run_killed_mid_way_resumes_from_its_finished_batches(model_dir, tmp_path, monkeypatch):
    real, seen, killed = generation.generate_batch, [], []

    def dies_on_second_batch(model, prompts, **kwargs):
        if len(seen) == 1 and not killed:
            killed.append(True)
            raise KeyboardInterrupt
        seen.append(len(prompts))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(model_dir, tmp_path)
    assert not (arm(tmp_path, model_dir) / "gsm8k.jsonl").exists()

    seen.clear()
    assert run(model_dir, tmp_path)["n"] == LIMIT
    assert sum(seen) == LIMIT - 2  # the first part's 2 questions were kept


def test_accuracy_counts_equivalent_answers_on_a_custom_jsonl_file(model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    bench = tmp_path / "data" / "mine.jsonl"
    bench.parent.mkdir()
    golds = ["18", "18.00", "7", "19"]
    bench.write_text(
        "".join(json.dumps({"problem": f"Janet has {g} eggs .", "answer": g}) + "\n" for g in golds)
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reply = tokenizer("The answer is 18 .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    monkeypatch.setattr(
        generation, "generate_batch", lambda model, prompts, **kw: [(reply, True) for _ in prompts]
    )

    summary = run(model_dir, tmp_path / "out", benchmark=str(bench), limit=None)

    rows = read_jsonl(arm(tmp_path / "out", model_dir) / "mine.jsonl")
    assert [r["answer"] for r in rows] == ["18"] * 4
    assert [r["correct"] for r in rows] == [True, True, False, False]
    assert (summary["benchmark"], summary["n"], summary["correct"], summary["accuracy"]) == (
        "mine",
        4,
        2,
        50.0,
    )
    assert (summary["truncated"], summary["no_answer"]) == (0, 0)


def test_questions_are_sharded_by_batch_across_ranks_and_rank_zero_merges(
    model_dir, tmp_path, calls, monkeypatch
):
    barrier, loading = threading.Barrier(2, timeout=120), threading.Lock()
    real_load = generation.load_model

    def load_one_at_a_time(*args, **kwargs):
        # Ranks are threads here; from_pretrained is not thread-safe (real ranks are processes).
        with loading:
            return real_load(*args, **kwargs)

    monkeypatch.setattr(generation, "load_model", load_one_at_a_time)

    class ThreadRank(Distributed):
        def barrier(self):
            barrier.wait()

    def rank(r):
        threading.current_thread().name = f"rank{r}"
        return run(model_dir, tmp_path, batch_size=2, limit=10, distributed=ThreadRank(r, 2))

    with ThreadPoolExecutor(2) as pool:
        summaries = [f.result() for f in [pool.submit(rank, r) for r in (0, 1)]]

    # 10 questions in the planner's 4 parts per rank (2, 2, then six of 1), dealt by cost: 5 to each rank
    shares = Counter()
    for name, n, _ in calls:
        shares[name] += n
    assert shares == {"rank0": 5, "rank1": 5} and len(calls) == 8
    assert summaries[0] == summaries[1]
    assert len(read_jsonl(arm(tmp_path, model_dir) / "gsm8k.jsonl")) == 10


def test_an_adapter_is_merged_and_gets_its_own_table_row(model_dir, tmp_path, calls):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")

    base_summary = run(model_dir, tmp_path / "out", limit=2)
    summary = run(model_dir, tmp_path / "out", limit=2, adapter=adapter)

    assert summary["adapter"] == adapter
    base_rows = read_jsonl(arm(tmp_path / "out", model_dir) / "gsm8k.jsonl")
    adapter_rows = read_jsonl(arm(tmp_path / "out", model_dir, adapter) / "gsm8k.jsonl")
    assert [r["prediction"] for r in adapter_rows] != [r["prediction"] for r in base_rows], (
        "the adapter changed what was generated"
    )
    assert sum(n for _, n, _ in calls) == 4  # the adapter's generations are not the base model's cache
    table = ev.read_results(tmp_path / "out" / "results.md")
    assert [row[:3] for row in table] == [[model_dir, "-", "gsm8k"], [model_dir, adapter, "gsm8k"]]
    assert table[0][4] == f"{base_summary['accuracy']:.2f}"
    # Both arms' per-question rows survive in one output folder: paired tests need them.
    assert len(base_rows) == len(adapter_rows) == 2
    assert (
        json.loads((arm(tmp_path / "out", model_dir, adapter) / "gsm8k.summary.json").read_text()) == summary
    )
    assert arm(tmp_path / "out", model_dir) != arm(tmp_path / "out", model_dir, adapter)


def eval_model(model_dir: str, adapter: str | None):
    """The model the hf loop evaluates: what the one sampler factory loads for (model, adapter)."""
    from axolotl_upft.args import SamplingConfig
    from axolotl_upft.trained import TrainedModel

    model = TrainedModel(model_dir, adapter)
    return generation.load_sampler(model, generation.resolve_sampling(SamplingConfig(), model)).model


def test_the_eval_model_with_an_adapter_has_the_peft_models_logits_not_the_bases(model_dir, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(adapter)
    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        merged = eval_model(model_dir, str(adapter))(input_ids=ids).logits
        base = eval_model(model_dir, None)(input_ids=ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
        unmerged = peft.eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (merged - base).abs().max() > 1e-3


def test_results_table_refreshes_a_row_in_place_and_escapes_pipes(tmp_path):
    path = tmp_path / "results.md"
    row = {
        "model": "a|b",
        "adapter": None,
        "benchmark": "gsm8k",
        "n": 3,
        "accuracy": 33.33,
        "accuracy_flexible": 40.0,
    }
    ev.update_results(path, row)
    ev.update_results(path, {**row, "benchmark": "math500"})
    ev.update_results(path, {**row, "n": 4, "accuracy": 50.0})
    assert ev.read_results(path) == [
        ["a\\|b", "-", "gsm8k", "4", "50.00", "40.00"],
        ["a\\|b", "-", "math500", "3", "33.33", "40.00"],
    ]
    assert path.read_text().splitlines()[0] == "| model | adapter | benchmark | n | accuracy | flexible |"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "limit must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"benchmark": "nope"}, "unknown benchmark 'nope'"),
        ({"benchmark": "missing.jsonl"}, "no file at"),
    ],
)
def test_bad_arguments_fail_before_any_model_is_loaded(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run("no-such-model", tmp_path, **kwargs)


def test_an_output_dir_holding_the_benchmark_file_is_refused(tmp_path):
    bench = arm(tmp_path, "no-such-model") / "mine.jsonl"
    bench.parent.mkdir()
    bench.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="would be overwritten"):
        run("no-such-model", tmp_path, benchmark=str(bench))


def test_a_plain_sentence_answer_counts_under_the_flexible_reading_only(model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    bench = tmp_path / "data" / "sums.jsonl"
    bench.parent.mkdir()
    bench.write_text(
        "".join(json.dumps({"question": f"Janet has {g} eggs .", "answer": g}) + "\n" for g in ("18", "7"))
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reply = tokenizer("Janet has 7 eggs and 11 more , so 18 .", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(
        generation, "generate_batch", lambda model, prompts, **kw: [(reply, True) for _ in prompts]
    )

    summary = run(model_dir, tmp_path / "out", benchmark=str(bench), limit=None)

    rows = read_jsonl(arm(tmp_path / "out", model_dir) / "sums.jsonl")
    assert [(r["answer"], r["answer_flexible"]) for r in rows] == [(None, "18"), (None, "18")]
    assert [(r["correct"], r["correct_flexible"]) for r in rows] == [(False, True), (False, False)]
    assert (summary["accuracy"], summary["accuracy_flexible"]) == (0.0, 50.0)
    assert (summary["no_answer"], summary["no_answer_flexible"]) == (2, 0)


def torch_empty():
    import torch

    return torch.zeros(0, 32)


def empty_adapter(folder, tensors):
    """An adapter folder as a LoRA saved under ZeRO-3 without gathering leaves it: config, no weights."""
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    if tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "adapter_model.safetensors holds no tensors"),
        (
            {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch_empty()},
            "holds 1 empty tensors of 1",
        ),
        (None, "no adapter_config.json and adapter_model.safetensors"),
    ],
    ids=["no-tensors", "empty-tensors", "no-weights-file"],
)
def test_an_adapter_without_lora_weights_is_refused_before_any_model_is_loaded(tensors, message, tmp_path):
    adapter = empty_adapter(tmp_path / "adapter", tensors)
    with pytest.raises(ValueError, match=message) as err:
        run("no-such-model", tmp_path / "out", adapter=adapter)
    if tensors is not None:
        assert "stage3_gather_16bit_weights_on_model_save: true" in str(err.value)
    assert not (tmp_path / "out").exists(), "refused before anything was written"


def test_eval_after_train_refuses_an_empty_adapter_instead_of_grading_the_base_model(tiny_model, tmp_path):
    from axolotl.utils.dict import DictDefault

    from axolotl_upft.plugin import UPFTPlugin

    out = tmp_path / "out"
    empty_adapter(out, {})
    cfg = DictDefault(
        base_model=str(tiny_model),
        tokenizer_config=str(tiny_model),
        adapter="lora",
        output_dir=str(out),
        upft={"eval_after_train": ["gsm8k"]},
    )
    plugin = UPFTPlugin()
    plugin._trained = True
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        plugin.post_train_unload(cfg)
    assert not (out / "eval").exists()


def saved_adapter(folder, model_dir, *, safe_serialization=True):
    """A real LoRA adapter of the tiny model, saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


def test_a_bin_adapter_beside_the_trainers_training_args_bin_passes_the_adapter_check(model_dir, tmp_path):
    """`save_safetensors: false` leaves adapter_model.bin next to training_args.bin, a pickled object that
    `weights_only` loading refuses; the check read every .bin and crashed with UnpicklingError."""
    import torch
    from transformers import TrainingArguments

    adapter = saved_adapter(tmp_path / "out", model_dir, safe_serialization=False)
    torch.save(TrainingArguments(output_dir=str(adapter)), adapter / "training_args.bin")
    ev.check_adapter(adapter)
    assert ev.adapter_weights(adapter) == adapter / "adapter_model.bin", "the file PEFT loads"


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("kept", [0.0, 0.5], ids=["zero-bytes", "truncated"])
def test_a_truncated_adapter_file_is_refused_naming_the_file_and_the_zero3_fix(
    safe_serialization, kept, model_dir, tmp_path
):
    """It raised SafetensorError('header too small') or a zip error, with no word about the adapter."""
    adapter = saved_adapter(tmp_path / "adapter", model_dir, safe_serialization=safe_serialization)
    (weights,) = [p for p in adapter.iterdir() if p.stem == "adapter_model"]
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * kept)])
    message = rf"adapter {adapter}: {weights.name} \(\d+ bytes\) cannot be read .* cut short or never written"
    with pytest.raises(ValueError, match=message) as err:
        run("no-such-model", tmp_path / "out", adapter=str(adapter))
    assert "stage3_gather_16bit_weights_on_model_save: true" in str(err.value)
    assert not (tmp_path / "out").exists(), "refused before anything was written"
