"""Every example config and YAML block of the README and docs/ validates; the reference shows the defaults."""

import re
from pathlib import Path

import pytest
import yaml
from axolotl.utils.dict import DictDefault

from axolotl_upft.args import SamplingConfig, UPFTConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "example_configs").glob("*.yml"))
GPU = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 8, "compute_capability": "sm_90"}


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def yaml_blocks(*pages: Path) -> list[dict]:
    text = "\n".join(page.read_text() for page in pages)
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


def test_full_config_blocks_of_the_readme_and_docs_validate_through_axolotl():
    full = [b for b in yaml_blocks(*DOCS) if "base_model" in b]
    assert full and any("base_model" in b for b in yaml_blocks(ROOT / "README.md")), "the quickstart"
    for block in full:
        validate(block)


def test_axolotl_refuses_an_example_config_whose_prefix_length_reaches_max_new_tokens():
    raw = yaml.safe_load((ROOT / "example_configs" / "smollm2-135m-demo.yml").read_text())
    raw["upft"]["prefix_length"] = raw["upft"]["sampling"]["max_new_tokens"]
    with pytest.raises(ValueError, match=r"upft\.prefix_length \(256\) must be smaller than upft\.sampling"):
        validate(raw)


def test_the_quickstart_turns_off_what_stops_a_cpu_run():
    (quickstart,) = [b for b in yaml_blocks(ROOT / "README.md") if "base_model" in b]
    cpu = {"bf16": False, "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}
    assert {key: quickstart.get(key) for key in cpu} == cpu, "Axolotl 0.21 turns these on: no NVIDIA driver"


def test_the_reference_page_lists_every_key_with_the_code_default():
    (block,) = [b for b in yaml_blocks(ROOT / "docs" / "reference.md") if set(b) == {"upft"}]
    shown, defaults = block["upft"], UPFTConfig().model_dump()
    for name in UPFTConfig.model_fields:
        assert name in shown and shown[name] == defaults[name], f"upft.{name}: default {defaults[name]!r}"
    for name in SamplingConfig.model_fields:
        expected = defaults["sampling"][name]
        assert shown["sampling"].get(name, "missing") == expected, (
            f"upft.sampling.{name}: default {expected!r}"
        )


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
