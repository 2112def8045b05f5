"""The `type: upft` dataset: questions in, self-sampled UPFT rows (ids, mask, labels) out."""

import logging
from pathlib import Path

from axolotl.prompt_tokenizers import DatasetWrappingStrategy
from datasets import Dataset

from .args import UPFTConfig
from .rows import FULL, Row, full_row, prefix_row
from .samples import open_cache, prepare_questions, sample_questions
from .prompts import chat_messages, render_prompt_ids

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


def training_prompts(questions, tokenizer, upft: UPFTConfig, sequence_len: int) -> list[list[int]]:
    """Prompt ids each row trains on (prefix rows carry the instruction), checked before any sampling."""
    instruction = upft.prefix_instruction or None
    prompts = [
        q.prompt_ids
        if q.kind == FULL or not instruction
        else render_prompt_ids(tokenizer, chat_messages(q.text, upft.system_prompt, instruction))
        for q in questions
    ]
    for q, prompt in zip(questions, prompts):
        if len(prompt) >= sequence_len:
            raise ValueError(
                f"row {q.index}: its prompt is {len(prompt)} tokens, not shorter than sequence_len={sequence_len}, "
                "so no response token would be trained. Raise `sequence_len`, shorten the question, or drop the row."
            )
    return prompts


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
    prompts = training_prompts(questions, tokenizer, upft, sequence_len)
    cache, settings, stops = open_cache(
        upft.cache_dir or default_cache_dir(cfg), cfg.base_model, tokenizer, upft, questions
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = sample_questions(
        questions,
        cache,
        upft=upft,
        settings=settings,
        stops=stops,
        load_model=lambda: load_sampler(cfg.base_model, upft.sampling.backend, upft.sampling.tensor_parallel_size),
        pad_id=pad_id,
    )
    train_on_inputs = bool(cfg.get("train_on_inputs"))
    rows, cut, unfinished = [], 0, 0
    for q, prompt in zip(questions, prompts):
        record = records[q.index]
        if q.kind == FULL:
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
