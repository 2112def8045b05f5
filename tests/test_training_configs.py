"""The example configs' training setups, run for real on CPU: DeepSpeed JSON through `axolotl preprocess`,
QLoRA 4-bit and the sample-normalised loss through `axolotl train`. Each config keeps its own settings;
only the model, data, lengths and precision are swapped for the tiny model on CPU."""

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from test_axolotl_e2e import axolotl, prepared_rows, write_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "example_configs").glob("*.yml"))
SWAPPED = ("base_model", "datasets", "dataset_prepared_path", "output_dir")


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "example_configs" / name).read_text())


def tiny_config(tmp: Path, model: Path, questions: list[dict], source: dict, **overrides) -> Path:
    """`source` on the tiny model, 24 local questions and CPU precision; every other key as shipped."""
    kept = {k: v for k, v in source.items() if k not in SWAPPED}
    upft = kept["upft"] | {
        "prefix_length": min(kept["upft"]["prefix_length"], 8),  # below max_new_tokens, as upft: requires
        "sampling": kept["upft"].get("sampling", {})
        | {"max_new_tokens": 16, "batch_size": 8, "backend": "hf"},
    }
    if "deepspeed" in kept:
        kept["deepspeed"] = str(ROOT / kept["deepspeed"])
    cpu = {"sequence_len": 256, "bf16": False, "fp16": False, "dataset_num_proc": 1, "upft": upft}
    return write_config(tmp, model, questions, **kept | cpu | overrides)


def deepspeed_cases() -> dict[str, str]:
    """One config per distinct (DeepSpeed JSON, adapter): configs sharing both load DeepSpeed the same way."""
    cases = {}
    for path in CONFIGS:
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("deepspeed"):
            cases.setdefault(f"{Path(cfg['deepspeed']).stem}-{cfg.get('adapter') or 'full'}", path.name)
    return cases


def logged_dicts(log: str) -> list[dict]:
    """The metric dicts the HF trainer prints per logging step and at the end (tqdm shares their lines)."""
    return [ast.literal_eval(m) for m in re.findall(r"\{'(?:loss|train_runtime)'[^{}]*\}", log)]


@pytest.mark.parametrize("case", sorted(deepspeed_cases().items()), ids=sorted(deepspeed_cases()))
def test_each_deepspeed_json_an_example_config_names_loads_through_axolotl_preprocess(
    case, tmp_path, tiny_model, questions
):
    pytest.importorskip(
        "deepspeed", reason="the DeepSpeed configs need `pip install deepspeed` (DS_BUILD_OPS=0)"
    )
    _, name = case
    source = example(name)
    config = tiny_config(tmp_path, tiny_model, questions, source)
    log = axolotl("preprocess", config)
    stage = json.loads((ROOT / source["deepspeed"]).read_text())["zero_optimization"]["stage"]
    assert f'"stage": {stage}' in log, "Axolotl read the repo's DeepSpeed JSON into its config"
    _, rows = prepared_rows(tmp_path)
    assert len(rows) == 24


def test_every_deepspeed_example_config_is_covered_by_a_preprocess_case():
    named = {yaml.safe_load(p.read_text()).get("deepspeed") for p in CONFIGS} - {None}
    covered = {example(name)["deepspeed"] for name in deepspeed_cases().values()}
    assert named == covered, "every DeepSpeed JSON an example names is preprocessed above"
    assert {"example_configs/deepspeed/zero2.json", "example_configs/deepspeed/zero3.json"} <= named


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model, questions) -> tuple[Path, str]:
    """The QLoRA example for 2 steps of 8 micro-batches: the whole epoch, so both row kinds are logged."""
    tmp = tmp_path_factory.mktemp("qlora")
    source = example("llama3.1-8b-qlora-k8.yml")
    assert source["load_in_4bit"] is True and source["adapter"] == "qlora"
    assert source["upft"]["loss_normalization"] == "sample"
    config = tiny_config(
        tmp,
        tiny_model,
        questions,
        source,
        max_steps=2,
        save_strategy="no",
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
    )
    return tmp, axolotl("train", config)


def test_qlora_example_trains_in_4bit_on_cpu_with_the_plugin_and_saves_the_adapter(qlora_run):
    tmp, log = qlora_run
    assert "prepare_model_for_kbit_training" in log, "Axolotl took its k-bit (bitsandbytes) loading path"
    quant = json.loads((tmp / "out" / "config.json").read_text())["quantization_config"]
    assert quant["load_in_4bit"] is True and quant["bnb_4bit_quant_type"] == "nf4"
    assert "train_loss" in log
    assert (tmp / "out" / "adapter_model.safetensors").exists()


def test_sample_normalisation_logs_prefix_and_full_loss_through_axolotls_logging(qlora_run):
    _, log = qlora_run
    steps = [d for d in logged_dicts(log) if "loss" in d]
    assert len(steps) == 2, "one log line per optimizer step (logging_steps: 1)"
    assert all("upft/prefix_loss" in d and "upft/prefix_tokens" in d for d in steps)
    assert any("upft/full_loss" in d for d in steps), "the 2 full traces of 24 rows fall in a logged step"
    for d in steps:
        assert float(d["upft/prefix_loss"]) > 0
