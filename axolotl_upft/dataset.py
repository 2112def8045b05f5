"""The `type: upft` dataset: questions in, self-sampled UPFT rows (ids, mask, labels) out."""

import json
from collections import Counter

from axolotl.integrations.base import PluginManager
from axolotl.prompt_tokenizers import DatasetWrappingStrategy
from datasets import Dataset, DatasetInfo
from pydantic import BaseModel

from .args import ARGS_PATH, AXOLOTL_SEQUENCE_LEN, UPFTConfig, first_upft_dataset
from .cache import Record, SampleCache
from .distributed import Distributed
from .grading import is_correct
from .logs import get_logger
from .prompts import ChatFormat, check_tokenizer, pad_token_id
from .rows import FULL, Row, full_row, prefix_row
from .selfsample import Question, open_cache, prepare_questions, sample_questions
from .trained import TrainedModel

LOG = get_logger(__name__)
SAMPLES_DIR = "upft_samples_dir"


def upft_config(cfg) -> UPFTConfig:
    """The `upft:` block, once the plugin is known to be registered (else Axolotl dropped the block)."""
    plugins = PluginManager.get_instance().plugins.values()
    if not any(p.get_input_args() == ARGS_PATH for p in plugins):
        raise ValueError(
            "`type: upft` needs the UPFT plugin: add `plugins: [axolotl_upft.UPFTPlugin]` to the config "
            "(without it Axolotl drops the `upft:` block)."
        )
    return UPFTConfig.from_cfg(cfg)


def group_by_row(questions: list[Question]) -> dict[int, list[Question]]:
    groups: dict[int, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.row, []).append(q)
    return groups


def chat_format(tokenizer, cfg, ds_cfg=None) -> ChatFormat:
    """The prompt format of Axolotl's `type: chat_template` for this config: the template it picks (the
    dataset's `chat_template`, the config's, or the tokenizer's own), `chat_template_kwargs`, `eot_tokens`."""
    from axolotl.utils.chat_templates import extract_chat_template_args, get_chat_template_from_config

    check_tokenizer(tokenizer)
    ds_cfg = ds_cfg.model_dump() if isinstance(ds_cfg, BaseModel) else ds_cfg
    choice, _ = extract_chat_template_args(cfg, ds_cfg)
    return ChatFormat(
        tokenizer,
        get_chat_template_from_config(cfg, ds_cfg, tokenizer),
        f"chat_template: {choice}",
        dict(cfg.get("chat_template_kwargs") or {}),
        tuple(cfg.get("eot_tokens") or ()),
    )


def config_chat_format(cfg) -> ChatFormat:
    """A training config's chat format, for `eval --config`, `analyze` and `eval_after_train`: the tokenizer
    Axolotl builds from it and its first `type: upft` dataset's template keys."""
    from axolotl.loaders import load_tokenizer

    return chat_format(load_tokenizer(cfg), cfg, first_upft_dataset(cfg))


def training_prompts(
    groups: dict[int, list[Question]], chat: ChatFormat, upft: UPFTConfig, sequence_len: int
) -> dict:
    """Prompt ids each row trains on (prefix rows carry the instruction), checked before any sampling."""
    instruction = upft.prefix_instruction or None
    prompts = {}
    for row, (q, *_) in groups.items():
        prompts[row] = (
            q.prompt_ids
            if q.target == FULL or not instruction
            else chat.prompt_ids(q.text, upft.system_prompt, instruction)
        )
        if len(prompts[row]) >= sequence_len:
            raise ValueError(
                f"row {row}: its prompt is {len(prompts[row])} tokens, not shorter than "
                f"sequence_len={sequence_len}, so no response token would be trained. "
                "Raise `sequence_len`, shorten the question, or drop the row."
            )
    return prompts


def choose_sample(tasks: list[Question], records: dict[int, Record], tokenizer) -> Record | None:
    """The first sample of a row; with a gold answer, the first finished one whose answer is right."""
    if tasks[0].gold is None:
        return records[tasks[0].index]
    for q in tasks:
        record = records[q.index]
        if record.stopped and is_correct(tokenizer, record.ids, q.gold):
            return record
    return None


class UPFTDatasetStrategy(DatasetWrappingStrategy):
    def __init__(self, tokenizer, cfg, ds_cfg=None):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.ds_cfg = ds_cfg
        self.upft = upft_config(cfg)

    def wrap_dataset(self, dataset, process_count=None, keep_in_memory=False, **kwargs) -> Dataset:
        rows, cache = sample_and_build(dataset, self.tokenizer, self.cfg, self.upft, self.ds_cfg)
        columns = {
            "input_ids": [r.input_ids for r in rows],
            "attention_mask": [[1] * len(r.input_ids) for r in rows],
            "labels": [r.labels for r in rows],
        }
        # The sample folder travels with the rows, so `axolotl-upft sample` can read its summary.json back.
        return Dataset.from_dict(
            columns, info=DatasetInfo(description=json.dumps({SAMPLES_DIR: str(cache.dir)}))
        )


def build_rows(dataset, tokenizer, cfg, upft: UPFTConfig, ds_cfg=None) -> list[Row]:
    """UPFT rows of the dataset's questions, sampling what the cache lacks."""
    return sample_and_build(dataset, tokenizer, cfg, upft, ds_cfg)[0]


def sample_and_build(dataset, tokenizer, cfg, upft: UPFTConfig, ds_cfg=None) -> tuple[list[Row], SampleCache]:
    """Every check first, then sampling (into the cache), then one row per question."""
    from .generation import resolve_sampling

    sequence_len = cfg.get("sequence_len") or AXOLOTL_SEQUENCE_LEN
    chat = chat_format(tokenizer, cfg, ds_cfg)
    questions = prepare_questions(dataset, chat, upft)
    groups = group_by_row(questions)
    prompts = training_prompts(groups, chat, upft, sequence_len)
    model = TrainedModel(cfg.base_model)
    upft = upft.model_copy(update={"sampling": resolve_sampling(upft.sampling, model)})
    cache, settings, stops = open_cache(
        str(upft.sample_cache_root(cfg)), cfg.base_model, chat, upft, questions
    )
    records = sample_questions(
        questions,
        cache,
        upft=upft,
        settings=settings,
        stops=stops,
        model=model,
        pad_id=pad_token_id(tokenizer),
        dist=Distributed.from_cfg(cfg),
    )
    rows, counts = [], Counter()
    for index, tasks in groups.items():
        record = choose_sample(tasks, records, tokenizer)
        if record is None:
            counts["unsolved"] += 1
            continue
        counts["unfinished"] += tasks[0].target == FULL and not record.stopped
        row = make_row(tasks[0].target, prompts[index], record, chat, stops, upft, cfg)
        counts["cut"] += len(row.input_ids) > sequence_len
        rows.append(Row(row.input_ids[:sequence_len], row.labels[:sequence_len], row.kind))
    report_rows(rows, counts, upft, len(groups), sequence_len, cache)
    return rows, cache


def make_row(
    target: str, prompt: list[int], record: Record, chat: ChatFormat, stops, upft: UPFTConfig, cfg
) -> Row:
    """A prefix row ends with the token that ends an assistant turn (`ChatFormat.turn_end_id`), the
    reference's EOS for the paper's models."""
    train_on_inputs = bool(cfg.get("train_on_inputs"))
    if target == FULL:
        return full_row(prompt, record.ids, stop_ids=stops, train_on_inputs=train_on_inputs)
    return prefix_row(
        prompt,
        record.ids,
        prefix_length=upft.prefix_length,
        stop_ids=stops,
        eos_token_id=chat.turn_end_id if upft.prefix_eos else None,
        train_on_inputs=train_on_inputs,
    )


def report_rows(
    rows: list[Row], counts: Counter, upft: UPFTConfig, questions: int, sequence_len: int, cache
) -> None:
    """Log what was built; warn about dropped, unfinished and cut rows; refuse an empty dataset."""
    full = sum(r.kind == FULL for r in rows)
    if counts["unsolved"]:
        LOG.warning(
            "UPFT (%s): %d of %d questions had no sample with the gold answer among %d and were dropped",
            "rft" if upft.mode == "rft" else "label_filter",
            counts["unsolved"],
            questions,
            upft.num_samples,
        )
    if not rows:
        raise ValueError(
            f"UPFT: no question kept a correct sample (num_samples={upft.num_samples}); nothing to train on. "
            "Raise upft.num_samples or check upft.answer_field."
        )
    LOG.info(
        "UPFT: %d rows (%d prefix with k=%d, %d full), %d trained tokens; samples in %s",
        len(rows),
        len(rows) - full,
        upft.prefix_length,
        full,
        sum(r.num_trained for r in rows),
        cache.dir,
    )
    if counts["unfinished"]:
        LOG.warning(
            "UPFT: %d of %d full traces reached sampling.max_new_tokens=%d before EOS; they are trained "
            "without an EOS. Raise upft.sampling.max_new_tokens to keep whole traces.",
            counts["unfinished"],
            full,
            upft.sampling.max_new_tokens,
        )
    if counts["cut"]:
        LOG.warning(
            "UPFT: %d rows were longer than sequence_len=%d and lost their last tokens (the prompt is kept "
            "whole). Raise sequence_len to keep them.",
            counts["cut"],
            sequence_len,
        )


def load(tokenizer, cfg, ds_cfg=None, processor=None):
    return UPFTDatasetStrategy(tokenizer, cfg, ds_cfg)
