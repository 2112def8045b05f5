"""From data rows to cached samples: validate every question, plan batches, sample what is missing."""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

from .args import UPFTConfig
from .distributed import Distributed
from .cache import Record, SampleCache, digest, ids_digest
from .prompts import chat_messages, check_tokenizer, question_text, render_prompt_ids
from .rows import FULL, PREFIX, question_kinds

LOG = logging.getLogger(__name__)
RFT_SAMPLES = 16


@dataclass(frozen=True)
class Question:
    """One sampling task: `kind` is what is sampled (prefix stops at k), `target` the row it may become."""

    index: int
    text: str
    prompt_ids: list[int]
    kind: str
    row: int = -1
    target: str = ""
    gold: str | None = None


def prepare_questions(rows: Iterable[dict], tokenizer, upft: UPFTConfig) -> list[Question]:
    """Every sampling task, rendered and split before any sampling, so bad rows fail first."""
    from .grading import gold_answer

    check_tokenizer(tokenizer)
    rows = list(rows)
    texts = [
        question_text(row, i, field=upft.question_field, template=upft.question_template)
        for i, row in enumerate(rows)
    ]
    if not texts:
        raise ValueError("the `type: upft` dataset has no rows; point `path:` at a file of questions.")
    golds = [None] * len(rows)
    if upft.needs_gold:
        for i, row in enumerate(rows):
            try:
                golds[i] = gold_answer(row, None, field=upft.answer_field)
            except ValueError as err:
                raise ValueError(
                    f"upft.answer_field: row {i}: {err}. mode: rft and label_filter grade samples against it; "
                    "set upft.answer_field to the gold answer's column."
                ) from None
    targets = [FULL] * len(texts) if upft.mode != "upft" else question_kinds(len(texts), upft.structure_ratio, upft.seed)
    copies = upft.num_samples if upft.needs_gold else 1
    tasks = []
    for i, (text, target) in enumerate(zip(texts, targets)):
        prompt = render_prompt_ids(tokenizer, chat_messages(text, upft.system_prompt))
        kind = FULL if upft.needs_gold else target
        tasks += [Question(i * copies + j, text, prompt, kind, i, target, golds[i]) for j in range(copies)]
    return tasks


def stop_ids(tokenizer, generation_config: dict) -> frozenset[int]:
    eos = generation_config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return frozenset(i for i in [tokenizer.eos_token_id, *eos] if i is not None)


def read_generation_config(base_model: str) -> dict:
    """The model's own generation_config.json, read raw: unset keys stay unset (as vLLM reads it)."""
    path = Path(base_model)
    if path.is_dir():
        local = path / "generation_config.json"
        return json.loads(local.read_text()) if local.exists() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(base_model, "generation_config.json")).read_text())
    except RemoteEntryNotFoundError:
        LOG.info("UPFT: %s has no generation_config.json; using sampler defaults", base_model)
    except OSError as err:  # no network, offline and not cached, HTTP errors
        LOG.warning(
            "UPFT: could not read generation_config.json of %s (%s): its top_p, top_k and EOS ids are not "
            "applied. Set upft.sampling.top_p / top_k, or make the file reachable.", base_model, err,
        )
    return {}


def hub_revision(name: str) -> str:
    """The commit a hub model id resolves to now: the snapshot folder of its config.json (online/cached)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name, "config.json")).parent.name


def model_fingerprint(base_model: str) -> dict:
    """Identity of a model without reading its weights: a folder's config and weight files (names, sizes,
    dates), or a hub id with the revision it resolves to."""
    path = Path(base_model)
    if not path.is_dir():
        return {"name": base_model, "revision": hub_revision(base_model)}
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    return {
        "path": str(path.resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def sampling_settings(upft: UPFTConfig, generation_config: dict) -> dict:
    s = upft.sampling
    return {
        "temperature": s.temperature,
        "top_p": s.top_p if s.top_p is not None else generation_config.get("top_p", 1.0),
        "top_k": s.top_k if s.top_k is not None else generation_config.get("top_k", 0),
        "repetition_penalty": s.repetition_penalty,
        "max_new_tokens": s.max_new_tokens,
    }


def open_cache(
    cache_root: str, base_model: str, tokenizer, upft: UPFTConfig, questions: list[Question]
) -> tuple[SampleCache, dict, frozenset[int]]:
    generation_config = read_generation_config(base_model)
    settings = sampling_settings(upft, generation_config)
    stops = stop_ids(tokenizer, generation_config)
    meta = {
        "model": model_fingerprint(base_model),
        "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id],
        "sampling": settings,
        "stop_ids": sorted(stops),
        "seed": upft.seed,
        "prefix_length": upft.prefix_length,
        "structure_ratio": upft.structure_ratio,
        "questions": len(questions),
        "questions_digest": digest([[q.kind, ids_digest(q.prompt_ids)] for q in questions]),
    }
    cache = SampleCache(cache_root, digest(meta), meta)
    cache.open()
    return cache, settings, stops


def plan_batches(missing: list[Question], batch_size: int | dict[str, int]) -> list[list[Question]]:
    """Prefix and full questions apart (a prefix batch stops at k), length-sorted to cut padding.
    `batch_size` is one size, or one per kind."""
    sizes = batch_size if isinstance(batch_size, dict) else {PREFIX: batch_size, FULL: batch_size}
    batches = []
    for kind in (PREFIX, FULL):
        group = sorted((q for q in missing if q.kind == kind), key=lambda q: (len(q.prompt_ids), q.index))
        size = sizes.get(kind, 1)
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    return batches


def batch_seed(seed: int, batch: list[Question]) -> int:
    return int(digest([seed, [q.index for q in batch]])[:8], 16)


def sample_questions(
    questions: list[Question],
    cache: SampleCache,
    *,
    upft: UPFTConfig,
    settings: dict,
    stops: frozenset[int],
    load_model: Callable[[], object],
    pad_id: int,
    base_model: str = "",
    dist: Distributed | None = None,
) -> dict[int, Record]:
    """Sample every question the cache lacks (this rank's share of batches); return all records."""
    from .generation import resolve_backend, resolve_batch_sizes

    dist = dist or Distributed()
    rank, world_size, barrier = dist.rank, dist.world_size, dist.barrier

    done = cache.load()
    check_records(done, questions, cache)
    barrier()
    missing = [q for q in questions if q.index not in done]
    limits = {PREFIX: upft.prefix_length, FULL: settings["max_new_tokens"]}
    widths = {
        kind: max(len(q.prompt_ids) for q in group)
        for kind in (PREFIX, FULL)
        if (group := [q for q in missing if q.kind == kind])
    }
    backend = resolve_backend(upft.sampling.backend)
    batch_sizes = dist.minimum(resolve_batch_sizes(upft.sampling, backend, base_model, widths, limits))
    batches = plan_batches(missing, batch_sizes)
    mine = batches[rank::world_size]
    started, new_tokens = time.perf_counter(), 0
    if mine:
        LOG.info(
            "UPFT: sampling %d of %d questions (%d cached) in %d batches of up to %s on rank %d/%d",
            sum(map(len, mine)), len(questions), len(done), len(mine), batch_sizes, rank, world_size,
        )
        model = load_model()
        bar = tqdm(total=len(missing), desc="UPFT sampling", unit="q", disable=rank != 0)
        for batch in mine:
            outputs = model.generate(
                [q.prompt_ids for q in batch],
                max_new_tokens=limits[batch[0].kind],
                stop_ids=stops,
                pad_id=pad_id,
                temperature=settings["temperature"],
                top_p=settings["top_p"],
                top_k=settings["top_k"],
                repetition_penalty=settings["repetition_penalty"],
                seed=batch_seed(upft.seed, batch),
            )
            records = [
                Record(q.index, q.kind, ids_digest(q.prompt_ids), ids, stopped)
                for q, (ids, stopped) in zip(batch, outputs)
            ]
            cache.write_part(records)
            new_tokens += sum(len(r.ids) for r in records)
            bar.update(max(0, cache.count_done() - len(done) - bar.n))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
        bar.close()
        del model
    barrier()
    records = cache.load()
    if len(records) < len(questions):
        raise RuntimeError(f"UPFT: {len(questions) - len(records)} questions have no sample in {cache.dir}")
    if rank == 0:
        if not cache.is_complete():
            new = sum(len(r.ids) for i, r in records.items() if i not in done)
            cache.write_summary(summarize(questions, records, time.perf_counter() - started, new))
    barrier()
    return records


def check_records(done: dict[int, Record], questions: list[Question], cache: SampleCache) -> None:
    for index, record in done.items():
        if index >= len(questions) or record.prompt_digest != ids_digest(questions[index].prompt_ids):
            raise RuntimeError(
                f"{cache.dir}: the cached sample of question {index} was drawn for another prompt. "
                f"Delete {cache.dir} to sample again."
            )


def summarize(questions: list[Question], records: dict[int, Record], seconds: float, new_tokens: int) -> dict:
    full = [r for r in records.values() if r.kind == FULL]
    total = sum(len(r.ids) for r in records.values())
    mean_full = sum(len(r.ids) for r in full) / len(full) if full else None
    rows = len({q.row for q in questions})
    rft = round(RFT_SAMPLES * mean_full * rows) if mean_full else None
    return {
        "questions": rows,
        "samples_per_question": len(questions) // rows,
        "prefix": len(records) - len(full),
        "full": len(full),
        "tokens_generated": total,
        "tokens_generated_this_run": new_tokens,
        "wall_seconds_this_run": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 and new_tokens else None,
        "rft16_equivalent_tokens": rft,
        "saving_vs_rft16_percent": round(100 * (1 - total / rft), 2) if rft else None,
    }
