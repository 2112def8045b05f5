"""Every example config and every README YAML block validates, and the README shows the real defaults."""

import re
from pathlib import Path

import pytest
import yaml
from axolotl.utils.dict import DictDefault

from axolotl_upft.args import UPFTConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "example_configs").glob("*.yml"))
GPU = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 8, "compute_capability": "sm_90"}


def readme_yaml_blocks() -> list[dict]:
    text = (ROOT / "README.md").read_text()
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)]


def validate(raw: dict):
    import torch
    from axolotl.utils.config import prepare_plugins, validate_config

    cfg = DictDefault(raw)
    prepare_plugins(cfg)
    env = {"torch_version": torch.__version__.split("+")[0]}
    return validate_config(cfg, capabilities=GPU, env_capabilities=env)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_validates_through_axolotl_with_its_upft_block(path):
    raw = yaml.safe_load(path.read_text())
    cfg = validate(raw)
    assert cfg.upft == UPFTConfig.model_validate(raw["upft"]).model_dump(exclude_none=True)
    assert raw["datasets"][0]["type"] == "upft"
    header = path.read_text().splitlines()[0]
    assert header.startswith("# UPFT"), "each config opens with what it is; the command follows"
    assert "axolotl " in path.read_text().split("\nbase_model")[0], "the header gives the command"


def test_example_configs_cover_the_papers_k_per_model():
    k = {p.name: yaml.safe_load(p.read_text())["upft"]["prefix_length"] for p in CONFIGS}
    assert k["llama3.1-8b-qlora-k8.yml"] == 8
    assert k["qwen2.5-math-7b-zero3-k32.yml"] == 32
    assert k["r1-distill-qwen-7b-zero3-k128.yml"] == 128


def test_deepspeed_configs_named_by_examples_exist():
    for path in CONFIGS:
        ds = yaml.safe_load(path.read_text()).get("deepspeed")
        assert ds is None or (ROOT / ds).exists(), ds


def test_readme_full_config_blocks_validate_through_axolotl():
    full = [b for b in readme_yaml_blocks() if "base_model" in b]
    assert full
    for block in full:
        validate(block)


def test_readme_upft_block_lists_every_key_with_the_code_default():
    (block,) = [b for b in readme_yaml_blocks() if set(b) == {"upft"}]
    assert block["upft"] == UPFTConfig().model_dump()


def test_axolotl_refuses_an_example_config_whose_prefix_length_reaches_max_new_tokens():
    raw = yaml.safe_load((ROOT / "example_configs" / "smollm2-135m-demo.yml").read_text())
    raw["upft"]["prefix_length"] = raw["upft"]["sampling"]["max_new_tokens"]
    with pytest.raises(ValueError, match=r"upft\.prefix_length \(256\) must be smaller than upft\.sampling"):
        validate(raw)
