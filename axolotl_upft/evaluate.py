"""Greedy, zero-shot benchmark evaluation: chat template, last ``\\boxed{}``, math-verify grading.

Layout of ``output_dir``:
  parts/<benchmark>/<key>/part-*.jsonl   generated token ids per finished batch (the sample cache's format);
                                         the key covers model, adapter, tokenizer, data file and settings
  <arm>/<benchmark>.jsonl                one graded row per question (rank 0, after every rank finished);
                                         <arm> names the model and adapter (`arm_name`): no overwrites
  <arm>/<benchmark>.summary.json         strict and flexible accuracy and token counts of the run
  benchmarks/<name>.jsonl                the rows of a built-in reasoning-gym benchmark (`benchmarks.py`)
  results.md                             one table row per (model, adapter, benchmark), refreshed in place
A rerun reuses every cached batch, so a killed run resumes and a finished one only re-grades.
"""

import hashlib
import json
import re
from math import prod
from pathlib import Path

from . import benchmarks
from .args import SamplingConfig
from .cache import Record, atomic_write_text, digest, model_fingerprint
from .distributed import Distributed
from .generation import call_sizes, engine_length, load_sampler, resolve_batch_size, resolve_sampling
from .grading import (
    BENCHMARKS,
    benchmark_path,
    extract_answer,
    extract_answer_flexible,
    gold_answer,
    is_equivalent,
)
from .inputs import read_rows
from .logs import get_logger
from .loop import Prompt, generate_all, longest, widest
from .prompts import ChatFormat, pad_token_id, question_text
from .selfsample import (
    context_key,
    engine_cache,
    read_generation_config,
    report_context_cut,
    stop_ids,
)
from .trained import TrainedModel

LOG = get_logger(__name__)
KIND = "greedy"
RESULTS_HEADER = ["model", "adapter", "benchmark", "n", "accuracy", "flexible"]
GREEDY = {"temperature": 0, "top_p": None, "top_k": None, "repetition_penalty": 1.0}
ZERO3_UNGATHERED = (
    "A LoRA saved under DeepSpeed ZeRO-3 without gathering looks like this: set "
    "`stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed JSON and train (or save) again."
)
HF_EVAL_BATCH = 16  # rows the hf loop decodes at a time in eval; vLLM's parts have no cap unless set
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def evaluate(
    model_path: str,
    benchmark: str,
    *,
    adapter: str | None = None,
    limit: int | None = None,
    output_dir: str | Path,
    system_prompt: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    answer_field: str = "answer",
    question_field: str | None = None,
    question_template: str | None = None,
    data_dir: str | Path | None = None,
    distributed: Distributed | None = None,
    chat: ChatFormat | None = None,
    sampling: SamplingConfig | None = None,
    backend: str | None = None,
    quantization: str | None = None,
) -> dict:
    """Greedy accuracy of ``model_path`` (+ ``adapter``) on a benchmark; chat=None: the tokenizer's own.
    ``quantization`` loads the base as training did (`trained.eval_quantization`; None: 16-bit).
    The sampler is upft.sampling's (``sampling``: a training config's, else the defaults) with
    ``max_new_tokens`` and ``backend`` where given (`eval_sampling`); decoding is greedy."""
    sampling = eval_sampling(sampling, max_new_tokens=max_new_tokens, backend=backend)
    _check_args(limit=limit, max_new_tokens=sampling.max_new_tokens, batch_size=batch_size)
    check_adapter(adapter)
    dist = distributed or Distributed()
    path, name, out = output_paths(benchmark, data_dir, output_dir)
    arm = out / arm_name(model_path, adapter)
    check_not_benchmark(arm / f"{name}.jsonl", path)
    rows = read_rows(path, limit)
    fields = {"field": question_field, "template": question_template}
    texts = [question_text(row, i, **fields) for i, row in enumerate(rows)]
    chat = chat or ChatFormat.own(load_tokenizer(model_path, adapter))
    requests = eval_requests(chat, texts, system_prompt)
    stops = stop_ids(chat.tokenizer, read_generation_config(model_path), chat.end_ids)
    model = TrainedModel(model_path, adapter, quantization)
    sampling = resolve_sampling(sampling, model)
    settings = {
        "system_prompt": system_prompt,
        "max_new_tokens": sampling.max_new_tokens,
        "stop_ids": sorted(stops),
    }
    cache = eval_cache(out / "parts" / name, model, chat, path, settings=settings, sampling=sampling)
    if dist.rank == 0:
        cache.open()
    dist.barrier()
    options = {"stop_ids": stops, "pad_id": pad_token_id(chat.tokenizer)}
    generated, cut = greedy(requests, cache, model, sampling, batch_size, options, dist)
    if dist.rank == 0:
        graded = grade_rows(chat.tokenizer, name, rows, answer_field, texts, generated.records)
        summary = summarize(graded, model=model_path, adapter=adapter, benchmark=name, path=path)
        summary |= settings_summary(settings, generated) | {"backend": sampling.backend, "context_cut": cut}
        write_outputs(out, arm, name, graded, summary)
        LOG.info(
            "UPFT eval: %s %s accuracy %.2f%% (n=%d)", model_path, name, summary["accuracy"], summary["n"]
        )
    dist.barrier()
    return json.loads((arm / f"{name}.summary.json").read_text())


def eval_sampling(
    sampling: SamplingConfig | None, *, max_new_tokens: int | None = None, backend: str | None = None
) -> SamplingConfig:
    """The one rule of `eval`, `eval --config` and `eval_after_train`: upft.sampling (the config's, else the
    defaults), with --max-new-tokens and --backend where they are given."""
    updates = {"max_new_tokens": max_new_tokens, "backend": backend}
    updates = {k: v for k, v in updates.items() if v is not None}
    return (sampling or SamplingConfig()).model_copy(update=updates)


def eval_fields(
    benchmark: str, upft, question_field: str | None = None, answer_field: str | None = None
) -> dict:
    """Where a benchmark's questions and answers are: --question-field / --answer-field, else for a .jsonl
    file the training config's upft.question_field / question_template / answer_field (the fields its rows
    were built from); named benchmarks keep their own fields."""
    own = benchmark.endswith(".jsonl")
    return {
        "question_field": question_field or (upft.question_field if own else None),
        "question_template": upft.question_template if own and not question_field else None,
        "answer_field": answer_field or (upft.answer_field if own else "answer"),
    }


def settings_summary(settings: dict, generated) -> dict:
    """What a summary records of the run besides its grades."""
    return {
        "max_new_tokens": settings["max_new_tokens"],
        "system_prompt": settings["system_prompt"],
        "tokens_generated_this_run": generated.new_tokens,
        "wall_seconds": round(generated.seconds, 3),
    }


def greedy(requests, cache, model: TrainedModel, sampling: SamplingConfig, batch_size, options: dict, dist):
    """Greedy generations of every request (this rank's share of batches) and how many ran into the engine's
    context end. ``batch_size`` None: upft.sampling.batch_size, else 16 rows at a time for the hf loop and
    no cap for vLLM (parts are then sized from the number of questions and ranks alone)."""
    backend = sampling.backend
    default = HF_EVAL_BATCH if backend == "hf" else resolve_batch_size(None, backend)
    batch_size = batch_size or sampling.batch_size or default
    limits = {KIND: sampling.max_new_tokens}
    length = engine_length(sampling, model, widest(requests), longest(requests, limits))
    generated = generate_all(
        requests,
        cache,
        lambda: load_sampler(model, sampling, length),
        sizes=call_sizes({KIND: batch_size}, backend, "dynamic"),
        limits=limits,
        options=GREEDY | options,
        seed=0,
        dist=dist,
        desc=f"eval {cache.dir.parent.name}",
    )
    return generated, report_context_cut(requests, generated.records, length)


def eval_requests(chat: ChatFormat, texts: list[str], system_prompt: str | None) -> list[Prompt]:
    """One greedy request per question, rendered as the training rows' full-trace prompts are."""
    chat.check(system_prompt, key="--system-prompt / upft.system_prompt")
    return [Prompt(i, chat.prompt_ids(text, system_prompt), KIND) for i, text in enumerate(texts)]


def check_adapter(adapter: str | Path | None) -> None:
    """Refuse an adapter folder without LoRA weights, before anything is loaded: PEFT only warns, and the
    base model's accuracy would be reported as the adapter's."""
    if adapter is None:
        return
    folder = Path(adapter)
    path = adapter_weights(folder)
    if not (folder / "adapter_config.json").exists() or path is None:
        raise ValueError(
            f"adapter {folder}: no adapter_config.json and adapter_model.safetensors (or .bin) there. "
            "Point --adapter at the folder a LoRA run saved (its output_dir)."
        )
    sizes = tensor_sizes(path)
    empty = sorted(name for name, size in sizes.items() if size == 0)
    if not sizes or empty:
        found = "no tensors" if not sizes else f"{len(empty)} empty tensors of {len(sizes)} (e.g. {empty[0]})"
        raise ValueError(
            f"adapter {folder}: {path.name} holds {found}: the LoRA weights were not saved, and evaluating "
            f"it would report the base model's accuracy. {ZERO3_UNGATHERED}"
        )


def adapter_weights(folder: Path) -> Path | None:
    """The one file PEFT loads an adapter from (`peft.utils.load_peft_weights`): adapter_model.safetensors,
    else adapter_model.bin; never the Trainer's training_args.bin beside it."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    return next(
        (folder / n for n in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if (folder / n).is_file()), None
    )


def tensor_sizes(path: Path) -> dict[str, int]:
    """Element count of every tensor in an adapter's weight file, from the safetensors header where it can; a
    file cut short (or never written) stops with its name and the fix."""
    from pickle import UnpicklingError

    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                return {k: prod(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 (not a dict)
        import torch

        return {k: v.numel() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    except (SafetensorError, UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(
            f"adapter {path.parent}: {path.name} ({path.stat().st_size} bytes) cannot be read ({err}): it "
            f"was cut short or never written. {ZERO3_UNGATHERED} Otherwise save or copy the adapter again."
        ) from None


def grade_rows(tokenizer, name: str, rows: list[dict], answer_field: str, texts, records) -> list[dict]:
    """Graded rows in question order; a built-in benchmark is judged by its own checker."""
    golds = [gold_answer(row, name, answer_field) for row in rows]
    checker = (lambda answer, i: benchmarks.is_correct(name, answer, rows[i])) if builtin(name) else None
    return grade(tokenizer, texts, golds, [records[i] for i in range(len(rows))], checker)


def builtin(benchmark: str) -> bool:
    return benchmarks.parse_name(benchmark) is not None


def output_paths(benchmark: str, data_dir, output_dir) -> tuple[Path, str, Path]:
    """(benchmark file, its name in the outputs, output folder); a built-in one is written there first."""
    out = Path(output_dir)
    if builtin(benchmark):
        return benchmarks.write_benchmark(benchmark, out / "benchmarks"), benchmark.lower(), out
    path = benchmark_path(benchmark, data_dir)
    return path, benchmark.lower() if benchmark.lower() in BENCHMARKS else path.stem, out


def check_not_benchmark(target: Path, path: Path) -> None:
    if target.resolve() == path.resolve():
        raise ValueError(
            f"output_dir: {target} is the benchmark file itself and would be overwritten; "
            "choose another output_dir"
        )


def arm_name(model_path: str, adapter: str | None) -> str:
    """Folder name of one (model, adapter) pair's results: readable, and distinct for distinct paths."""
    parts = [Path(model_path).name] + ([Path(adapter).parent.name, Path(adapter).name] if adapter else [])
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", "+".join(p for p in parts if p))
    return f"{slug}-{digest([str(model_path), str(adapter) if adapter else None])[:8]}"


def eval_cache(root: Path, model: TrainedModel, chat: ChatFormat, path: Path, *, settings: dict, sampling):
    """The generations' cache, keyed by model, adapter, prompt format, benchmark file, settings and engine."""
    meta = {
        "task": "eval",
        "model": model_fingerprint(model.base_model),
        "adapter": model_fingerprint(model.adapter) if model.adapter else None,
        **({"quantization": model.quantization} if model.quantization else {}),
        "chat": chat.key(),
        "benchmark": file_digest(path),
        **settings,
        **context_key(sampling),
    }
    return engine_cache(root, meta, sampling)


def _check_args(**values) -> None:
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            hint = "; leave it unset to evaluate every question" if key == "limit" else ""
            raise ValueError(f"{key} must be a positive integer, got {value!r}{hint}")


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def load_tokenizer(model_path: str, adapter: str | None):
    """The adapter's own tokenizer when it saved one (its chat template may differ), else the model's."""
    from transformers import AutoTokenizer

    source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model_path
    return AutoTokenizer.from_pretrained(source)


def grade(
    tokenizer, questions: list[str], golds: list[str], records: list[Record], checker=None
) -> list[dict]:
    """One result row per question, in benchmark order: the strict answer and the flexible one
    (last number as fallback), each checked by ``checker(answer, index)`` or else by ``is_equivalent``."""
    check = checker or (lambda answer, index: is_equivalent(answer, golds[index]))
    rows = []
    for index, (question, gold, record) in enumerate(zip(questions, golds, records)):
        text = tokenizer.decode(record.ids, skip_special_tokens=True)
        answer = extract_answer(text)
        flexible = extract_answer_flexible(text)
        rows.append(
            {
                "index": index,
                "question": question,
                "gold": gold,
                "prediction": text,
                "answer": answer,
                "correct": check(answer, index),
                "answer_flexible": flexible,
                "correct_flexible": check(flexible, index),
                "tokens": len(record.ids),
                "stopped": record.stopped,
            }
        )
    return rows


def summarize(rows: list[dict], *, model: str, adapter: str | None, benchmark: str, path: Path) -> dict:
    correct = sum(row["correct"] for row in rows)
    return {
        "model": model,
        "adapter": adapter,
        "benchmark": benchmark,
        "benchmark_file": str(path),
        "n": len(rows),
        "correct": correct,
        "accuracy": round(100 * correct / len(rows), 2),
        "mean_tokens": round(sum(row["tokens"] for row in rows) / len(rows), 1),
        "truncated": sum(not row["stopped"] for row in rows),
        "no_answer": sum(row["answer"] is None for row in rows),
        "correct_flexible": sum(row["correct_flexible"] for row in rows),
        "accuracy_flexible": round(100 * sum(row["correct_flexible"] for row in rows) / len(rows), 2),
        "no_answer_flexible": sum(row["answer_flexible"] is None for row in rows),
    }


def write_outputs(out: Path, arm: Path, name: str, rows: list[dict], summary: dict) -> None:
    atomic_write_text(arm / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_text(arm / f"{name}.summary.json", json.dumps(summary, indent=2))
    update_results(out / "results.md", summary)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def update_results(path: Path, summary: dict) -> None:
    """Refresh this (model, adapter, benchmark)'s row of the Markdown table, or append it."""
    row = [
        _cell(summary["model"]),
        _cell(summary["adapter"] or "-"),
        _cell(summary["benchmark"]),
        str(summary["n"]),
        f"{summary['accuracy']:.2f}",
        f"{summary['accuracy_flexible']:.2f}",
    ]
    table = read_results(path)
    for i, old in enumerate(table):
        if old[:3] == row[:3]:
            table[i] = row
            break
    else:
        table.append(row)
    lines = ["| " + " | ".join(RESULTS_HEADER) + " |", "|" + "---|" * len(RESULTS_HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_results(path: Path) -> list[list[str]]:
    """Rows of a results.md table (cells still escaped), header and rule excluded."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines()[2:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in _CELL_SPLIT.split(line.strip())[1:-1]])
    return rows
