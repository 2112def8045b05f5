"""From data rows to cached samples: the questions, their sampling settings and cache, the run summary."""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .args import SamplingConfig, UPFTConfig
from .cache import Record, SampleCache, check_writable, digest, ids_digest, model_fingerprint
from .distributed import Distributed
from .logs import get_logger
from .loop import Generated, context_cut, generate_all, longest, widest, widths
from .prompts import ChatFormat, question_text
from .rows import FULL, PREFIX, question_kinds
from .trained import TrainedModel

LOG = get_logger(__name__)
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


def engine_key(sampling: SamplingConfig, backend: str | None = None) -> list:
    """What draws the tokens, for cache keys: the backend of resolved upft.sampling, the draw version (the
    seeds both engines get, the hf loop's draw) and the dtype. The same seed draws other tokens on another
    engine, so a key names its engine."""
    from .generation import DRAW_VERSION

    return [backend or sampling.backend, DRAW_VERSION, sampling.dtype]


def keyed_cache(root, meta: dict) -> SampleCache:
    return SampleCache(root, digest(meta), meta)


def engine_cache(root, meta: dict, sampling: SamplingConfig) -> SampleCache:
    """The sample cache of `meta` drawn by resolved upft.sampling's engine. With `backend: auto`, which
    depends on what is installed, a finished cache of the other engine for otherwise identical settings is
    reused (with a log line) rather than everything drawn again."""
    own = keyed_cache(root, meta | {"engine": engine_key(sampling)})
    if own.is_complete() or not sampling._auto:
        return own
    other = engine_key(sampling, "hf" if sampling.backend == "vllm" else "vllm")
    found = keyed_cache(root, meta | {"engine": other})
    if not found.is_complete():
        return own
    LOG.warning(
        "UPFT: backend auto resolved to %s, but %s holds the finished samples %s drew with the same "
        "settings: reusing them (set upft.sampling.backend to draw with one engine only)",
        sampling.backend,
        found.dir,
        other[0],
    )
    return found


def context_key(sampling: SamplingConfig) -> dict:
    """A user-set max_model_len cuts vLLM's traces, so it joins the cache key (unset: the key's prompts,
    max_new_tokens and model already fix the engine's context)."""
    if sampling.backend == "vllm" and sampling.max_model_len is not None:
        return {"max_model_len": sampling.max_model_len}
    return {}


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
    cache_root: str, model: TrainedModel, chat: ChatFormat, upft: UPFTConfig, questions: list[Question]
) -> tuple[SampleCache, dict, frozenset[int]]:
    base_model = model.base_model
    generation_config = read_generation_config(base_model)
    settings = sampling_settings(upft.sampling, generation_config)
    stops = stop_ids(chat.tokenizer, generation_config, chat.end_ids)
    meta = {
        "model": model_fingerprint(base_model),
        **model.key(),  # quantization and adapter
        "chat": chat.key(),
        "sampling": settings,
        "stop_ids": sorted(stops),
        "seed": upft.seed,
        # Full-trace-only sets (sft, rft, label_filter) draw the same samples whatever k is, so they share
        # a cache; p acts through the kinds, which the questions' digest holds.
        "prefix_length": upft.prefix_length if any(q.kind == PREFIX for q in questions) else None,
        "questions": len(questions),
        "questions_digest": digest([[q.kind, ids_digest(q.prompt_ids)] for q in questions]),
        **context_key(upft.sampling),
    }
    cache = engine_cache(cache_root, meta, upft.sampling)
    if not cache.is_complete():  # a finished cache is only read: it may sit on a read-only disk
        check_writable(cache.dir, "upft.cache_dir")
    if not cache.dir.exists():
        log_why_not_reused(cache)
    cache.open()
    return cache, settings, stops


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys (dotted, one level into nested dicts) whose values differ between two meta.json files."""
    changed = []
    for key in sorted((set(old) | set(new)) - {"key", "format"}):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            changed += changed_keys(a, b, f"{key}.")
        elif a != b:
            changed.append(prefix + key)
    return changed


def log_why_not_reused(cache: SampleCache) -> None:
    """A new sample set next to older ones: name what differs from the newest, so a user sees why the
    samples of an earlier run were not reused."""
    metas = sorted(cache.dir.parent.glob("*/meta.json"), key=lambda p: p.stat().st_mtime)
    if not metas:
        return
    changed = changed_keys(json.loads(metas[-1].read_text()), cache.meta)
    LOG.info(
        "UPFT: the samples in %s were drawn with other settings, not reused (changed: %s); sampling anew",
        metas[-1].parent,
        ", ".join(changed) or "nothing in meta.json",
    )


def sample_questions(
    questions: list[Question],
    cache: SampleCache,
    *,
    upft: UPFTConfig,
    settings: dict,
    stops: frozenset[int],
    model: TrainedModel,
    pad_id: int,
    dist: Distributed | None = None,
) -> dict[int, Record]:
    """Sample every question the cache lacks (this rank's share of batches) with `load_sampler` on `model`
    and upft.sampling resolved (`resolve_sampling`); return all records."""
    from .generation import call_sizes, engine_length, load_sampler, resolve_batch_sizes

    dist = dist or Distributed()
    sampling = upft.sampling
    limits = {PREFIX: upft.prefix_length, FULL: settings["max_new_tokens"]}
    length = engine_length(sampling, model, widest(questions), longest(questions, limits))
    sizes = resolve_batch_sizes(sampling, sampling.backend, model.base_model, widths(questions), limits)
    sizes = call_sizes(dist.minimum(sizes), sampling.backend, sampling.cache_implementation)
    generated = generate_all(
        questions,
        cache,
        lambda: load_sampler(model, sampling, length),
        sizes={kind: sizes[kind] for kind in (PREFIX, FULL) if kind in sizes},
        limits=limits,
        options=sampling_options(settings, stops, pad_id),
        seed=upft.seed,
        dist=dist,
        desc="UPFT sampling",
    )
    report_context_cut(questions, generated.records, length)
    summary = summarize(questions, generated)
    if dist.rank == 0 and not cache.is_complete():
        cache.write_summary(summary)
    LOG.info(summary_block(summary, upft, cache))
    dist.barrier()
    return generated.records


def report_context_cut(requests, records: dict[int, Record], length: int | None) -> int:
    """Log how many generations stopped at the engine's context end (max_model_len), not at a stop id."""
    cut = context_cut(requests, records, length)
    if cut:
        LOG.warning(
            "UPFT: %d of %d generations stopped at the end of the engine's context (max_model_len=%d), not "
            "at a stop id. Raise upft.sampling.max_model_len (at most the model's max_position_embeddings) "
            "or shorten the prompts to keep them whole.",
            cut,
            len(requests),
            length,
        )
    return cut


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
        "cached": generated.cached,
        "unfinished": sum(not r.stopped for r in full),
        "tokens_generated": total,
        "tokens_generated_this_run": new_tokens,
        "wall_seconds_this_run": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 and new_tokens else None,
        "rft16_equivalent_tokens": rft,
        "saving_vs_rft16_percent": round(100 * (1 - total / rft), 2) if rft else None,
    }


def engine_choice(backend: str) -> str:
    """The engine that sampled and why: the setting, and for `auto` whether vLLM is installed."""
    from .generation import is_vllm_available, resolve_backend

    if backend != "auto":
        return f"{backend} (upft.sampling.backend: {backend})"
    why = "vLLM is installed" if is_vllm_available() else "vLLM is not installed"
    return f"{resolve_backend(backend)} (upft.sampling.backend: auto, {why})"


def summary_block(summary: dict, upft: UPFTConfig, cache: SampleCache) -> str:
    """What sampling did, as one block in the console: engine, counts, cache reuse, speed, cache folder."""
    samples, cached, full = summary["prefix"] + summary["full"], summary["cached"], summary["full"]
    speed = f" ({summary['tokens_per_second']} tokens/s)" if summary["tokens_per_second"] else ""
    each = f"{summary['samples_per_question']} sample(s) each"
    total, new = summary["tokens_generated"], summary["tokens_generated_this_run"]
    seconds = summary["wall_seconds_this_run"]
    limit = f"upft.sampling.max_new_tokens={upft.sampling.max_new_tokens}"
    lines = [
        "UPFT sample summary",
        f"  engine:      {engine_choice(upft.sampling.backend)}",
        f"  questions:   {summary['questions']} ({each}): {summary['prefix']} prefixes "
        + f"(k={upft.prefix_length}), {full} full traces",
        f"  samples:     {cached} of {samples} from the cache, {samples - cached} generated now",
        f"  tokens:      {total:,} in all, {new:,} generated now in {seconds:.1f} s{speed}",
        f"  unfinished:  {summary['unfinished']} of {full} full traces reached {limit}",
        f"  cache:       {cache.dir}  (decoded: axolotl-upft show-samples CONFIG --n 5)",
    ]
    return "\n".join(lines)
