"""The `type: upft` dataset: questions in, self-sampled UPFT rows (ids, mask, labels) out."""

import logging
from pathlib import Path

from axolotl.prompt_tokenizers import DatasetWrappingStrategy
from datasets import Dataset

from .args import UPFTConfig
from .rows import FULL, Row, full_row, prefix_row
from .cache import Record
from .samples import Question, open_cache, prepare_questions, sample_questions
from .prompts import chat_messages, pad_token_id, render_prompt_ids

LOG = logging.getLogger(__name__)


def upft_config(cfg) -> UPFTConfig:
    from .plugin import UPFTPlugin, plugin_is_registered

    if not plugin_is_registered():
        raise ValueError(
            "`type: upft` needs the UPFT plugin: add `plugins: [axolotl_upft.UPFTPlugin]` to the config "
            f"(without it Axolotl drops the `upft:` block). Plugin class: {UPFTPlugin.__module__}.UPFTPlugin"
        )
    return UPFTConfig.model_validate(dict(cfg.get("upft") or {}))


def default_cache_dir(cfg) -> str:
    return str(Path(cfg.get("dataset_prepared_path") or "last_run_prepared") / "upft_samples")


def group_by_row(questions: list[Question]) -> dict[int, list[Question]]:
    groups: dict[int, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.row, []).append(q)
    return groups


def training_prompts(groups: dict[int, list[Question]], tokenizer, upft: UPFTConfig, sequence_len: int) -> dict:
    """Prompt ids each row trains on (prefix rows carry the instruction), checked before any sampling."""
    instruction = upft.prefix_instruction or None
    prompts = {}
    for row, (q, *_) in groups.items():
        prompts[row] = (
            q.prompt_ids
            if q.target == FULL or not instruction
            else render_prompt_ids(tokenizer, chat_messages(q.text, upft.system_prompt, instruction))
        )
        if len(prompts[row]) >= sequence_len:
            raise ValueError(
                f"row {row}: its prompt is {len(prompts[row])} tokens, not shorter than sequence_len={sequence_len}, "
                "so no response token would be trained. Raise `sequence_len`, shorten the question, or drop the row."
            )
    return prompts


def is_correct(tokenizer, ids: list[int], gold: str) -> bool:
    from .grading import extract_answer_flexible, is_equivalent

    return is_equivalent(extract_answer_flexible(tokenizer.decode(ids, skip_special_tokens=True)), gold)


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
    def __init__(self, tokenizer, cfg):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.upft = upft_config(cfg)

    def wrap_dataset(self, dataset, process_count=None, keep_in_memory=False, **kwargs) -> Dataset:
        rows = build_rows(dataset, self.tokenizer, self.cfg, self.upft)
        return Dataset.from_dict(
            {
                "input_ids": [r.input_ids for r in rows],
                "attention_mask": [[1] * len(r.input_ids) for r in rows],
                "labels": [r.labels for r in rows],
            }
        )


def build_rows(dataset, tokenizer, cfg, upft: UPFTConfig) -> list[Row]:
    from .sampler import load_sampler

    sequence_len = cfg.get("sequence_len") or 2048
    questions = prepare_questions(dataset, tokenizer, upft)
    groups = group_by_row(questions)
    prompts = training_prompts(groups, tokenizer, upft, sequence_len)
    cache, settings, stops = open_cache(
        upft.cache_dir or default_cache_dir(cfg), cfg.base_model, tokenizer, upft, questions
    )
    pad_id = pad_token_id(tokenizer)
    records = sample_questions(
        questions,
        cache,
        upft=upft,
        settings=settings,
        stops=stops,
        load_model=lambda: load_sampler(cfg.base_model, upft.sampling),
        pad_id=pad_id,
        base_model=cfg.base_model,
    )
    train_on_inputs = bool(cfg.get("train_on_inputs"))
    rows, cut, unfinished, unsolved = [], 0, 0, 0
    for index, tasks in groups.items():
        record, prompt = choose_sample(tasks, records, tokenizer), prompts[index]
        if record is None:
            unsolved += 1
            continue
        if tasks[0].target == FULL:
            unfinished += not record.stopped
            row = full_row(prompt, record.ids, stop_ids=stops, train_on_inputs=train_on_inputs)
        else:
            row = prefix_row(
                prompt,
                record.ids,
                prefix_length=upft.prefix_length,
                stop_ids=stops,
                eos_token_id=tokenizer.eos_token_id if upft.prefix_eos else None,
                train_on_inputs=train_on_inputs,
            )
        cut += len(row.input_ids) > sequence_len
        rows.append(Row(row.input_ids[:sequence_len], row.labels[:sequence_len], row.kind))
    full = sum(r.kind == FULL for r in rows)
    if unsolved:
        LOG.warning(
            "UPFT (%s): %d of %d questions had no sample with the gold answer among %d and were dropped",
            "rft" if upft.mode == "rft" else "label_filter", unsolved, len(groups), upft.num_samples,
        )
    if not rows:
        raise ValueError(
            f"UPFT: no question kept a correct sample (num_samples={upft.num_samples}); nothing to train on. "
            "Raise upft.num_samples or check upft.answer_field."
        )
    LOG.info(
        "UPFT: %d rows (%d prefix with k=%d, %d full), %d trained tokens; samples in %s",
        len(rows), len(rows) - full, upft.prefix_length, full, sum(r.num_trained for r in rows), cache.dir,
    )
    if unfinished:
        LOG.warning(
            "UPFT: %d of %d full traces reached sampling.max_new_tokens=%d before EOS; they are trained "
            "without an EOS. Raise upft.sampling.max_new_tokens to keep whole traces.",
            unfinished, full, settings["max_new_tokens"],
        )
    if cut:
        LOG.warning(
            "UPFT: %d rows were longer than sequence_len=%d and lost their last tokens (the prompt is kept "
            "whole). Raise sequence_len to keep them.", cut, sequence_len,
        )
    return rows


def load(tokenizer, cfg, ds_cfg=None, processor=None):
    return UPFTDatasetStrategy(tokenizer, cfg)
