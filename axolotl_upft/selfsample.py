"""From data rows to cached samples: the questions, their sampling settings and cache, the run summary."""

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .args import SamplingConfig, UPFTConfig
from .cache import Record, SampleCache, digest, ids_digest, weight_files
from .distributed import Distributed
from .loop import Generated, generate_all, longest, widths
from .prompts import ChatFormat, question_text
from .rows import FULL, PREFIX, question_kinds

LOG = logging.getLogger(__name__)
RFT_SAMPLES = 16
# Beside the weights, what shapes a model's prompts and ids: configs, chat templates (transformers saves
# them as chat_template.jinja), sentencepiece / tiktoken vocabularies and BPE merges.
MODEL_FILES = ("*.json", "*.jinja", "additional_chat_templates/*.jinja", "*.model", "*.tiktoken", "*.txt")


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


def prepare_questions(rows: Iterable[dict], chat: ChatFormat, upft: UPFTConfig) -> list[Question]:
    """Every sampling task, rendered and split before any sampling, so bad rows fail first."""
    from .grading import gold_answer

    chat.check(upft.system_prompt)
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
                    f"upft.answer_field: row {i}: {err}. "
                    "mode: rft and label_filter grade samples against it; "
                    "set upft.answer_field to the gold answer's column."
                ) from None
    targets = (
        [FULL] * len(texts)
        if upft.mode != "upft"
        else question_kinds(len(texts), upft.structure_ratio, upft.seed)
    )
    copies = upft.num_samples if upft.needs_gold else 1
    tasks = []
    for i, (text, target) in enumerate(zip(texts, targets)):
        prompt = chat.prompt_ids(text, upft.system_prompt)
        kind = FULL if upft.needs_gold else target
        tasks += [Question(i * copies + j, text, prompt, kind, i, target, golds[i]) for j in range(copies)]
    return tasks


def stop_ids(tokenizer, generation_config: dict, end_ids: Iterable[int] = ()) -> frozenset[int]:
    """What ends a generation: EOS, the model's generation_config EOS ids and the template's end of turn
    (`ChatFormat.end_ids`: `eot_tokens` and the token that closes an assistant turn)."""
    eos = generation_config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return frozenset(i for i in [tokenizer.eos_token_id, *eos, *end_ids] if i is not None)


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
            "applied. Set upft.sampling.top_p / top_k, or make the file reachable.",
            base_model,
            err,
        )
    return {}


def hub_revision(name: str) -> str:
    """The commit a hub model id resolves to now: the snapshot folder of its config.json (online/cached)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name, "config.json")).parent.name


def model_fingerprint(base_model: str) -> dict:
    """Identity of a model without reading its weights: a folder's weight, config, tokenizer and template
    files (names, sizes, dates), or a hub id with the revision it resolves to."""
    path = Path(base_model)
    if not path.is_dir():
        return {"name": base_model, "revision": hub_revision(base_model)}
    files = sorted({*weight_files(path), *(p for pattern in MODEL_FILES for p in path.glob(pattern))})
    return {
        "path": str(path.resolve()),
        "files": [[p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def engine_key(backend: str, dtype: str) -> list:
    """What draws the tokens, for cache keys: the backend (with the hf loop's draw version) and the dtype.
    The same seed draws other tokens on another engine, so caches never cross engines."""
    from .generation import DRAW_VERSION, resolve_backend, resolve_dtype

    backend = resolve_backend(backend)
    return [backend, DRAW_VERSION if backend == "hf" else None, resolve_dtype(dtype)]


def sampling_settings(s: SamplingConfig, generation_config: dict) -> dict:
    """What a sample is drawn with: unset top_p / top_k come from the model's generation config."""
    return {
        "temperature": s.temperature,
        "top_p": s.top_p if s.top_p is not None else generation_config.get("top_p", 1.0),
        "top_k": s.top_k if s.top_k is not None else generation_config.get("top_k", 0),
        "repetition_penalty": s.repetition_penalty,
        "max_new_tokens": s.max_new_tokens,
    }


def open_cache(
    cache_root: str, base_model: str, chat: ChatFormat, upft: UPFTConfig, questions: list[Question]
) -> tuple[SampleCache, dict, frozenset[int]]:
    generation_config = read_generation_config(base_model)
    settings = sampling_settings(upft.sampling, generation_config)
    stops = stop_ids(chat.tokenizer, generation_config, chat.end_ids)
    meta = {
        "engine": engine_key(upft.sampling.backend, upft.sampling.dtype),
        "model": model_fingerprint(base_model),
        "chat": chat.key(),
        "sampling": settings,
        "stop_ids": sorted(stops),
        "seed": upft.seed,
        # Full-trace-only sets (sft, rft, label_filter) draw the same samples whatever k is, so they share
        # a cache; p acts through the kinds, which the questions' digest holds.
        "prefix_length": upft.prefix_length if any(q.kind == PREFIX for q in questions) else None,
        "questions": len(questions),
        "questions_digest": digest([[q.kind, ids_digest(q.prompt_ids)] for q in questions]),
    }
    cache = SampleCache(cache_root, digest(meta), meta)
    cache.open()
    return cache, settings, stops


def sample_questions(
    questions: list[Question],
    cache: SampleCache,
    *,
    upft: UPFTConfig,
    settings: dict,
    stops: frozenset[int],
    load_model: Callable[[int], object],
    pad_id: int,
    base_model: str = "",
    dist: Distributed | None = None,
) -> dict[int, Record]:
    """Sample every question the cache lacks (this rank's share of batches); return all records."""
    from .generation import call_sizes, resolve_backend, resolve_batch_sizes

    dist = dist or Distributed()
    limits = {PREFIX: upft.prefix_length, FULL: settings["max_new_tokens"]}
    backend = resolve_backend(upft.sampling.backend)
    sizes = dist.minimum(resolve_batch_sizes(upft.sampling, backend, base_model, widths(questions), limits))
    sizes = call_sizes(sizes, backend, upft.sampling.cache_implementation)
    generated = generate_all(
        questions,
        cache,
        lambda: load_model(longest(questions, limits)),
        sizes={kind: sizes[kind] for kind in (PREFIX, FULL) if kind in sizes},
        limits=limits,
        options=sampling_options(settings, stops, pad_id),
        seed=upft.seed,
        dist=dist,
        desc="UPFT sampling",
    )
    if dist.rank == 0 and not cache.is_complete():
        cache.write_summary(summarize(questions, generated))
    dist.barrier()
    return generated.records


def sampling_options(settings: dict, stops: frozenset[int], pad_id: int) -> dict:
    """The keyword arguments of a backend's `generate` for these sampling settings."""
    keys = ("temperature", "top_p", "top_k", "repetition_penalty")
    return {"stop_ids": stops, "pad_id": pad_id, **{key: settings[key] for key in keys}}


def summarize(questions: list[Question], generated: Generated) -> dict:
    records, seconds, new_tokens = generated.records, generated.seconds, generated.new_tokens
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
