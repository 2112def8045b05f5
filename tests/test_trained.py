"""The sampled model is the trained one: `TrainedModel.from_cfg`, the hf sampler on Axolotl's own loader
(QLoRA 4-bit, an adapter from lora_model_dir), and the memory it gives back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from axolotl.utils.dict import DictDefault
from test_axolotl_e2e import axolotl, prepared_rows, write_config

from axolotl_upft import generation
from axolotl_upft.args import SamplingConfig
from axolotl_upft.cache import SampleCache
from axolotl_upft.generation import HFSampler
from axolotl_upft.rows import IGNORE_INDEX, PREFIX
from axolotl_upft.trained import TrainedModel

K, MAX_NEW = 6, 16  # the preprocess run's prefix_length and max_new_tokens
HARNESS = Path(__file__).parent / "harness"


def raw_cfg(model: Path, **keys) -> DictDefault:
    return DictDefault({"base_model": str(model), "adapter": "qlora", "load_in_4bit": True} | keys)


def test_from_cfg_samples_what_training_loads_unless_upft_sampling_quantization_says_otherwise(
    tiny_model, tmp_path
):
    qlora = TrainedModel.from_cfg(raw_cfg(tiny_model, lora_model_dir=str(tmp_path)), SamplingConfig())
    assert (qlora.quantization, qlora.adapter) == ("bnb-4bit", str(tmp_path))
    assert qlora.cfg.load_in_4bit and qlora.cfg.adapter == "qlora", "Axolotl's loader derives the bnb config"
    sixteen = TrainedModel.from_cfg(raw_cfg(tiny_model), SamplingConfig(quantization="none"))
    assert (sixteen.quantization, sixteen.cfg.load_in_4bit, sixteen.cfg.adapter) == (None, False, "lora")
    eight = TrainedModel.from_cfg(raw_cfg(tiny_model), SamplingConfig(quantization="bnb-8bit"))
    assert (eight.quantization, eight.cfg.load_in_8bit, eight.cfg.load_in_4bit) == ("bnb-8bit", True, False)
    assert eight.cfg.adapter == "lora", "Axolotl quantizes to 8 bits under adapter: lora"
    sharded = TrainedModel.from_cfg(raw_cfg(tiny_model, fsdp_config={"x": 1}), SamplingConfig())
    assert sharded.cfg.fsdp_config is None, "each process samples with its own full copy"
    assert qlora.key() != sixteen.key(), "a QLoRA sample cache is never reused for a 16-bit run"
    with pytest.raises(ValueError, match="upft.sampling.quantization: bnb-4bit needs `adapter: lora`"):
        full = DictDefault(base_model=str(tiny_model))
        TrainedModel.from_cfg(full, SamplingConfig(quantization="bnb-4bit"))


def test_a_pre_quantized_checkpoint_samples_in_its_own_method_and_cannot_be_overridden(tmp_path):
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = DictDefault(base_model=str(tmp_path), adapter="lora")
    assert TrainedModel.from_cfg(cfg, SamplingConfig()).quantization == "gptq"
    with pytest.raises(ValueError, match="upft.sampling.quantization: none cannot re-quantize .* gptq"):
        TrainedModel.from_cfg(cfg, SamplingConfig(quantization="none"))


def test_dtype_auto_follows_the_models_torch_dtype_where_the_device_supports_it(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))
    assert generation.resolve_dtype("auto", str(tmp_path)) == "float32", "CPU"
    monkeypatch.setattr(generation, "sampling_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert generation.resolve_dtype("auto", str(tmp_path)) == "float16", "the checkpoint's own half type"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert generation.resolve_dtype("auto", str(tmp_path)) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert generation.resolve_dtype("auto", str(tmp_path)) == "float16", "pre-Ampere: no bfloat16"


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory, vllm_model) -> Path:
    """A LoRA on the model with random B (PEFT starts B at zero), so base + adapter decodes differently."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("round1-adapter")
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(vllm_model),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.save_pretrained(out)
    return out


@torch.inference_mode()
def greedy(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Plain greedy decoding, one prompt, no cache: the reference the sampler's batched loop must match."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]


def training_model(config: Path, **keys):
    """The model `axolotl train` builds from `config` (Axolotl's loader, not for inference), in eval mode."""
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import ModelLoader, load_tokenizer

    cfg = load_cfg(str(config))
    cfg.update(keys)
    model, _ = ModelLoader(cfg, load_tokenizer(cfg)).load()
    return model.eval()


def test_a_qlora_run_with_lora_model_dir_samples_greedily_from_its_4bit_base_plus_the_adapter(
    tmp_path, vllm_model, random_adapter, questions, tiny_tokenizer, monkeypatch
):
    monkeypatch.setenv("LOG_LEVEL", "INFO")  # Axolotl shows other loggers' records from WARNING up
    upft = {"prefix_length": K, "structure_ratio": 0.25, "cache_dir": str(tmp_path / "samples")}
    upft["sampling"] = {"max_new_tokens": MAX_NEW, "batch_size": 8, "backend": "hf", "temperature": 0}
    config = write_config(
        tmp_path, vllm_model, questions, load_in_4bit=True, adapter="qlora", upft=upft, sample_packing=False
    )
    config.write_text(config.read_text() + f"lora_model_dir: {random_adapter}\n")
    log = axolotl("preprocess", config)
    loaded = [line for line in log.splitlines() if "UPFT: sampling from" in line or "UPFT: loading" in line]
    assert "(14 Linear4bit;" in str(loaded), f"2 layers x 7 linears, all 4-bit: {loaded}"
    (meta,) = (tmp_path / "samples").glob("*/meta.json")
    meta = json.loads(meta.read_text())
    assert meta["quantization"] == "bnb-4bit" and meta["adapter"]["path"] == str(random_adapter.resolve())
    records = SampleCache(tmp_path / "samples", meta["key"], {}).load()

    eos = tiny_tokenizer.eos_token_id
    trained, base = training_model(config), training_model(config, lora_model_dir=None)
    same_as_base = 0
    for i, q in enumerate(questions[:24]):
        turn = [{"role": "user", "content": q["question"]}]
        chat = tiny_tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        prompt = tiny_tokenizer(chat, add_special_tokens=False)["input_ids"]
        steps = K if records[i].kind == PREFIX else MAX_NEW
        assert records[i].ids == greedy(trained, prompt, steps, eos), f"question {i}: the trained model's"
        same_as_base += records[i].ids[0] == greedy(base, prompt, 1, eos)[0]
    assert same_as_base <= 6, f"{same_as_base} of 24 first tokens are the base's: the adapter was not applied"

    _, rows = prepared_rows(tmp_path)
    for i, q in enumerate(questions[:24]):
        words = tiny_tokenizer(q["question"], add_special_tokens=False)["input_ids"]
        (row,) = [r for r in rows if str(words)[1:-1] in str(r["input_ids"])]
        prompt = sum(label == IGNORE_INDEX for label in row["labels"])
        response, ids = row["input_ids"][prompt:], records[i].ids
        assert row["labels"][prompt:] == response, "every sampled id is trained on"
        tail = [eos] if records[i].kind == PREFIX and ids[-1] != eos else []
        assert response == ids + tail, f"question {i}: its row holds its sample (+ EOS for a prefix)"


def test_without_a_cfg_the_sampler_loads_the_adapter_with_peft_on_top_of_the_base(
    vllm_model, random_adapter, tiny_tokenizer
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sampler = HFSampler.load(TrainedModel(str(vllm_model), adapter=str(random_adapter)), SamplingConfig())
    eos = tiny_tokenizer.eos_token_id
    prompts = [[5 + i, 6, 7, 8] for i in range(8)]
    options = {"stop_ids": frozenset([eos]), "pad_id": 0, "temperature": 0, "top_p": None, "top_k": None}
    sampled = [ids for ids, _ in sampler.generate(prompts, seeds=list(range(8)), max_new_tokens=4, **options)]
    sampler.close()
    base = AutoModelForCausalLM.from_pretrained(vllm_model).eval()
    assert sampled != [greedy(base, p, 4, eos) for p in prompts], "the adapter changes the samples"
    tuned = PeftModel.from_pretrained(base, random_adapter).eval()
    assert sampled == [greedy(tuned, p, 4, eos) for p in prompts], "base + adapter, greedy"


def test_the_sampler_gives_back_its_memory_for_a_16bit_and_a_4bit_model(tmp_path, vllm_model, tiny_corpus):
    model = tiny.build_model(tmp_path / "model", tiny_corpus, hidden=512, layers=8, heads=8)
    done = subprocess.run(
        [sys.executable, str(HARNESS / "sampler_memory.py"), str(vllm_model), str(model)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    sixteen = report["weights"]["16-bit"]
    assert report["weights"]["4-bit"] < sixteen / 3, "the QLoRA config's model was loaded in 4 bits"
    for case, after in report["after"].items():
        kept = after - report["before"]
        assert kept < sixteen / 10, f"{case}: {kept / 2**20:.1f} MiB stayed after close()"


def test_eval_of_a_qlora_config_loads_its_base_in_4_bits_and_a_saved_full_model_in_16(tmp_path, vllm_model):
    """`eval --config` and `eval_after_train` sample the trained model: under an adapter, the base in the
    config's quantization (upft.sampling.quantization: auto is as trained)."""
    import logging

    from axolotl_upft.evaluate import evaluate
    from axolotl_upft.logs import NAMESPACE
    from axolotl_upft.trained import eval_quantization

    cfg = raw_cfg(vllm_model)
    assert eval_quantization(cfg, SamplingConfig(), str(vllm_model)) == "bnb-4bit"
    assert eval_quantization(cfg, SamplingConfig(quantization="none"), str(vllm_model)) is None
    assert eval_quantization(cfg, SamplingConfig(), str(tmp_path / "saved")) is None, "a saved full model"
    bench = tmp_path / "mine.jsonl"
    bench.write_text(json.dumps({"question": "How many ?", "answer": "#### 18"}) + "\n")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(f"{NAMESPACE}.generation")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        out = tmp_path / "eval"
        evaluate(
            str(vllm_model),
            str(bench),
            output_dir=out,
            max_new_tokens=2,
            backend="hf",
            quantization="bnb-4bit",
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    loaded = [line for line in seen if line.startswith("UPFT: sampling from")]
    assert len(loaded) == 1 and "Linear4bit" in loaded[0], seen
    (meta,) = out.glob("parts/mine/*/meta.json")
    assert json.loads(meta.read_text())["quantization"] == "bnb-4bit", "a 4-bit eval is cached apart"
