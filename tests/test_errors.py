"""Every bad input stops before any sampling, with an error that names the row, key and fix."""

import json
import os
import shutil
import subprocess

import pytest
import yaml
from axolotl.utils.dict import DictDefault
from pydantic import ValidationError
from test_axolotl_e2e import run_axolotl, write_config

from axolotl_upft.args import UPFTConfig
from axolotl_upft.dataset import build_rows
from axolotl_upft.logs import NAMESPACE
from axolotl_upft.plugin import UPFTPlugin
from axolotl_upft.prompts import question_text


def run(rows, tokenizer, model, tmp_path, sequence_len=256, **upft):
    cfg = DictDefault({"base_model": str(model), "sequence_len": sequence_len})
    upft = UPFTConfig(cache_dir=str(tmp_path / "samples"), **upft)
    return build_rows(rows, tokenizer, cfg, upft)


@pytest.mark.parametrize(
    "block,key",
    [
        ({"prefix_length": 0}, "prefix_length"),
        ({"structure_ratio": 1.5}, "structure_ratio"),
        ({"structure_ratio": -0.1}, "structure_ratio"),
        ({"prefix_lenght": 8}, "prefix_lenght"),
        ({"sampling": {"temprature": 0.7}}, "temprature"),
    ],
)
def test_bad_upft_values_and_unknown_keys_are_rejected_by_name(block, key):
    with pytest.raises(ValidationError, match=key):
        UPFTConfig.model_validate(block)


def test_question_field_and_template_together_is_an_error():
    with pytest.raises(ValidationError, match="question_field or question_template"):
        UPFTConfig(question_field="q", question_template="{q}")


@pytest.mark.parametrize(
    "block",
    [
        {"prefix_length": 32, "sampling": {"max_new_tokens": 16}},
        {"prefix_length": 16, "sampling": {"max_new_tokens": 16}},
        {
            "prefix_length": 64,
            "structure_ratio": 0.0,
            "label_filter": True,
            "sampling": {"max_new_tokens": 32},
        },
    ],
    ids=["longer", "equal", "label_filter"],
)
def test_a_prefix_length_the_full_traces_cannot_exceed_is_refused_naming_both_keys(block):
    with pytest.raises(ValidationError, match=r"upft\.prefix_length \(\d+\) must be smaller") as err:
        UPFTConfig.model_validate(block)
    assert "upft.sampling.max_new_tokens" in str(err.value)


@pytest.mark.parametrize(
    "block",
    [
        {"prefix_length": 15, "sampling": {"max_new_tokens": 16}},
        {"prefix_length": 32, "structure_ratio": 1.0, "sampling": {"max_new_tokens": 16}},
        {"prefix_length": 32, "structure_ratio": 0.0, "sampling": {"max_new_tokens": 16}},
        {"prefix_length": 32, "mode": "sft", "sampling": {"max_new_tokens": 16}},
        {"prefix_length": 32, "mode": "rft", "sampling": {"max_new_tokens": 16}},
    ],
    ids=["shorter", "full-traces-only", "prefixes-only", "sft", "rft"],
)
def test_prefix_length_is_free_where_one_of_the_two_lengths_goes_unused(block):
    assert UPFTConfig.model_validate(block).prefix_length in (15, 32)


@pytest.mark.parametrize(
    "rows,options,message",
    [
        ([{"question": "a b"}, {"body": "x"}], {}, r"row 1: no question found .*the row has: body"),
        ([{"question": "a b"}, {"question": "  "}], {}, r"row 1: the question \(field 'question'\) is empty"),
        ([{"question": None}], {}, r"row 0: the question .* is empty or not text"),
        (
            [{"question": "a"}],
            {"question_field": "query"},
            r"upft.question_field: row 0 has no field 'query' .*question",
        ),
        (
            [{"Body": "a"}],
            {"question_template": "{Body} {Question}"},
            r"question_template: row 0 has no field 'Question'",
        ),
        (
            [{"Body": "a", "Question": "b"}, {"Body": None, "Question": "c"}],
            {"question_template": "{Body} {Question}"},
            r"upft.question_template: row 1 has no field 'Body' \(missing or null; the row has: Question\)",
        ),
    ],
)
def test_bad_rows_name_the_row_and_the_fix_and_sample_nothing(
    rows, options, message, tiny_tokenizer, tiny_model, tmp_path
):
    with pytest.raises(ValueError, match=message):
        run(rows, tiny_tokenizer, tiny_model, tmp_path, **options)
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{Question.strip}", r"\{Question.strip\} .* is not a plain field name"),
        ("{Question[0]}", "is not a plain field name"),
        ("{0} {Question}", "is not a plain field name"),
        ("{} {Question}", "is not a plain field name"),
        ("{Question!r}", "is not a plain field name"),
        ("{Question:>40}", "is not a plain field name"),
        ("{Body} {Question", r"is not a valid template \(expected '\}' before end of string\)"),
        ("Body} {Question}", r"is not a valid template \(Single '\}' encountered"),
        ("Solve it .", "names no field"),
    ],
)
def test_question_templates_other_than_plain_field_names_are_refused_at_config_validation(template, message):
    with pytest.raises(ValidationError, match=message) as err:
        UPFTConfig(question_template=template)
    assert "upft.question_template" in str(err.value)


def test_a_template_renders_literal_braces_and_non_text_fields_as_written():
    row = {"Body": "Tom has 3 .", "n": 7}
    assert question_text(row, 0, template="{{note}} {Body} n={n}") == "{note} Tom has 3 . n=7"


@pytest.mark.slow
def test_preprocess_stops_on_a_template_field_that_a_row_lacks_instead_of_training_on_none(
    tmp_path, tiny_model, questions
):
    """The JSON loader gives row 2 `Body: null`; it was sampled and trained as "None <question>"."""
    config = write_config(tmp_path, tiny_model, questions)
    data = tmp_path / "questions.jsonl"
    rows = [{"Body": "Read .", "Question": q["question"]} for q in questions[:4]]
    del rows[2]["Body"]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = yaml.safe_load(config.read_text())
    cfg["upft"]["question_template"] = "{Body} {Question}"
    config.write_text(yaml.safe_dump(cfg))
    done = run_axolotl("preprocess", config, timeout=300)
    log = done.stdout + done.stderr
    message = "upft.question_template: row 2 has no field 'Body' (missing or null; the row has: Question)"
    assert done.returncode != 0 and message in log, log[-3000:]
    assert not (tmp_path / "prepared" / "upft_samples").exists(), "nothing was sampled"


def test_tokenizer_without_chat_template_says_to_set_chat_template(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*chat_template:"):
        run([{"question": "a"}], tokenizer, tiny_model, tmp_path)


def test_tokenizer_without_eos_says_to_set_special_tokens(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token.*special_tokens"):
        run([{"question": "a"}], tokenizer, tiny_model, tmp_path)


def test_prompt_longer_than_sequence_len_names_the_row_and_its_length(tiny_tokenizer, tiny_model, tmp_path):
    rows = [{"question": "How many ?"}, {"question": " ".join(["clips"] * 80)}]
    with pytest.raises(ValueError, match=r"row 1: its prompt is \d+ tokens.*sequence_len=40"):
        run(rows, tiny_tokenizer, tiny_model, tmp_path, sequence_len=40, structure_ratio=0.0)


def test_rows_longer_than_sequence_len_lose_their_last_tokens_and_the_log_counts_them(
    tiny_tokenizer, tiny_model, tmp_path, questions, caplog
):
    rows = [{"question": q["question"]} for q in questions[:4]]
    options = {"structure_ratio": 1.0, "sampling": {"max_new_tokens": 24, "batch_size": 4}}
    whole = run(rows, tiny_tokenizer, tiny_model, tmp_path, sequence_len=512, **options)
    sequence_len = max(len(r.input_ids) - r.num_trained for r in whole) + 3  # every prompt fits, whole
    with caplog.at_level("WARNING", logger=NAMESPACE):
        cut = run(rows, tiny_tokenizer, tiny_model, tmp_path, sequence_len=sequence_len, **options)
    longer = sum(len(r.input_ids) > sequence_len for r in whole)
    assert longer > 0, "some trace is longer than sequence_len, or this test proves nothing"
    for before, after in zip(whole, cut):
        assert after.input_ids == before.input_ids[:sequence_len]
        assert after.labels == before.labels[:sequence_len]
    assert f"{longer} rows were longer than sequence_len={sequence_len}" in caplog.text


@pytest.mark.parametrize(
    ("row", "question"),
    [
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief ."},
                    {"role": "user", "content": "How many clips ?"},
                    {"role": "assistant", "content": "72"},
                ]
            },
            "How many clips ?",
        ),
        ({"instruction": "How many clips ?", "output": "72"}, "How many clips ?"),
        ({"problem": "How many clips ?", "instruction": "Solve ."}, "How many clips ?"),
    ],
    ids=["messages", "instruction", "problem-before-instruction"],
)
def test_questions_come_from_messages_or_instruction_rows(
    row, question, tiny_tokenizer, tiny_model, tmp_path
):
    from axolotl_upft.prompts import chat_messages, render_prompt_ids
    from axolotl_upft.rows import IGNORE_INDEX

    (built,) = run(
        [row],
        tiny_tokenizer,
        tiny_model,
        tmp_path,
        structure_ratio=1.0,
        sampling={"max_new_tokens": 4, "batch_size": 1},
    )
    prompt = render_prompt_ids(tiny_tokenizer, chat_messages(question, None))
    assert built.input_ids[: len(prompt)] == prompt
    assert built.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert built.num_trained == len(built.input_ids) - len(prompt), "only the sampled response is trained"


def load_datasets_hook(tmp_path, model, path, **upft):
    """The plugin's `load_datasets`, which Axolotl calls before it reads the data or the tokenizer."""
    cfg = DictDefault(
        base_model=str(model),
        datasets=[{"path": str(path), "type": "upft"}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        upft=upft,
    )
    return UPFTPlugin().load_datasets(cfg, preprocess=True)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("q.jsonl", b'{"question": "a"}\n{"question": "b"\n', r"q.jsonl: line 2 is not JSON \(Expecting"),
        (
            "q.jsonl",
            b'{"question": "a"}\n\n{"question": "caf\xe9"}\n',
            r"q.jsonl: line 3 is not UTF-8 text \(byte 0xe9 at column 18\); save the file as UTF-8",
        ),
        ("q.jsonl", b"", r"q.jsonl holds no rows; write one JSON object per line"),
        ("q.jsonl", b"\n  \n", r"q.jsonl holds no rows"),
        ("q.jsonl", b'{"question": "a"}\n["b"]\n', r"q.jsonl: line 2 is a JSON list, not an object"),
        ("q.json", b'[{"question": "a"},\n {"question": "b",}]\n', r"q.json: line 2, column 19 is not JSON"),
        ("q.json", b"[]", r"q.json: the list must hold one JSON object per row"),
        ("folder/sub/q.jsonl", b'{"question": "a"}\n{"question": \n', r"sub/q.jsonl: line 2 is not JSON"),
    ],
    ids=["malformed", "not-utf8", "empty", "blank", "not-object", "bad-document", "empty-document", "folder"],
)
def test_local_json_that_datasets_cannot_read_is_refused_naming_the_file_and_line_before_loading(
    name, content, message, tmp_path, tiny_model
):
    """`datasets` raised ArrowInvalid, a bare UnicodeDecodeError or StopIteration, naming neither."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    (tmp_path / "folder").mkdir(exist_ok=True)
    (tmp_path / "folder" / "good.jsonl").write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match=message):
        load_datasets_hook(tmp_path, tiny_model, tmp_path / "folder" if name.startswith("folder") else path)


def test_json_that_datasets_reads_passes_the_check_unchanged(tmp_path, tiny_model):
    from datasets import load_dataset

    lines = tmp_path / "q.jsonl"
    lines.write_text('{"question": "a"}\n\n{"question": "b", "Body": "x"}\n')
    document = tmp_path / "q.json"
    document.write_text('[\n  {"question": "a"},\n  {"question": "b"}\n]\n')
    for path in (lines, document):
        load_datasets_hook(tmp_path, tiny_model, path)
        assert len(load_dataset("json", data_files=str(path), split="train")) == 2


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_a_cache_dir_that_is_a_file_stops_before_anything_loads(where, tmp_path, tiny_model):
    blocker = tmp_path / "samples"
    blocker.write_text("")
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "a"}\n')
    cache_dir = blocker if where == "file" else blocker / "upft"
    message = rf"upft.cache_dir: cannot keep samples in {cache_dir}: {blocker} is a file, not a folder\. Set"
    with pytest.raises(ValueError, match=message):
        load_datasets_hook(tmp_path, tiny_model, data, cache_dir=str(cache_dir))


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write to: chmod for a user; for root, whom chmod does not stop, a
    read-only tmpfs where this machine allows mounting."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]
    if not shutil.which("mount") or subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root, and no read-only mount is allowed here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_cache_dir_stops_before_sampling_with_the_key_and_the_fix(
    read_only_dir, tmp_path, tiny_model, tiny_tokenizer
):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "a"}\n')
    below = read_only_dir / "samples"
    with pytest.raises(ValueError, match=rf"upft.cache_dir: cannot keep samples in {below}: .* is read-only"):
        load_datasets_hook(tmp_path, tiny_model, data, cache_dir=str(below))
    # An existing folder passes the hook (a finished cache is only read); the cache refuses it before writing.
    load_datasets_hook(tmp_path, tiny_model, data, cache_dir=str(read_only_dir))
    cfg = DictDefault({"base_model": str(tiny_model), "sequence_len": 256})
    with pytest.raises(ValueError, match=r"upft.cache_dir: cannot keep samples in .* is read-only\. Set"):
        build_rows([{"question": "a"}], tiny_tokenizer, cfg, UPFTConfig(cache_dir=str(read_only_dir)))
