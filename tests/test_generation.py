"""The generation backends: batch sizes per kind, memory estimate, static KV cache, the candidate sampler."""

import json

import pytest
import tiny
import torch

from axolotl_upft import generation
from axolotl_upft.args import UPFTConfig
from axolotl_upft.dataset import build_rows
from axolotl_upft.loop import request_seed

# The public Qwen2.5-0.5B and Qwen2.5-7B shapes (config.json keys the estimate reads)
QWEN_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
}
QWEN_7B = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
}
GIB = 2**30


def seeds(seed: int, prompts: list) -> list[int]:
    """The seeds the generation loop gives a run's requests 0..n-1."""
    return [request_seed(seed, i) for i in range(len(prompts))]


def test_rows_that_fit_counts_kv_cache_prefill_and_logits_bytes():
    # 0.5B, 160-token prompts, k = 32, bf16: KV 2*24*2*64*192*2 = 2,359,296; prefill 160*(4*896+3*4864)*2
    # + 14*160*160*2 = 5,816,320 + 716,800; logits 4*151936*4 = 2,430,976: 11,323,392 bytes a row
    assert generation.rows_that_fit(QWEN_05B, width=160, new_tokens=32, memory_bytes=11_323_392 * 100) == 100
    assert generation.rows_that_fit(QWEN_05B, width=160, new_tokens=32, memory_bytes=11_323_391 * 100) == 99
    assert generation.rows_that_fit(QWEN_05B, width=160, new_tokens=32, memory_bytes=1) == 1


def test_prefix_rows_fit_far_more_than_full_rows_and_bigger_models_fewer():
    memory = 32 * GIB
    prefix = generation.rows_that_fit(QWEN_7B, width=160, new_tokens=32, memory_bytes=memory)
    full = generation.rows_that_fit(QWEN_7B, width=160, new_tokens=16384, memory_bytes=memory)
    small = generation.rows_that_fit(QWEN_05B, width=160, new_tokens=32, memory_bytes=memory)
    assert 500 < prefix < 2048 and full < 64 and small > 2048


def test_text_config_of_multimodal_configs_is_read():
    assert generation.rows_that_fit(
        {"text_config": QWEN_05B}, width=160, new_tokens=32, memory_bytes=GIB
    ) == (generation.rows_that_fit(QWEN_05B, width=160, new_tokens=32, memory_bytes=GIB))


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({}, {"prefix": 16, "full": 16}),
        ({"batch_size": 8}, {"prefix": 8, "full": 8}),
        ({"prefix_batch_size": 64}, {"prefix": 64, "full": 16}),
        ({"batch_size": 4, "prefix_batch_size": 32}, {"prefix": 32, "full": 4}),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_batch_sizes_per_kind_on_cpu(sampling, expected, tiny_model):
    upft = UPFTConfig(sampling=sampling)
    sizes = generation.resolve_batch_sizes(
        upft.sampling, "hf", str(tiny_model), {"prefix": 40, "full": 40}, {"prefix": 32, "full": 1024}
    )
    assert sizes == expected


def test_static_width_pads_prompts_to_a_multiple_of_64():
    assert [generation.pad_width(w, "static") for w in (1, 64, 65, 160)] == [64, 64, 128, 192]
    assert generation.pad_width(65, "dynamic") == 65


def test_static_kv_cache_draws_the_same_greedy_samples_as_the_dynamic_one(
    tiny_model, tiny_tokenizer, questions
):
    from axolotl_upft.prompts import chat_messages, render_prompt_ids

    model = generation.load_model(str(tiny_model), torch.device("cpu"))
    prompts = [render_prompt_ids(tiny_tokenizer, chat_messages(q["question"], None)) for q in questions[:6]]
    assert len({len(p) for p in prompts}) > 1, "prompts of different widths exercise the left padding"
    options = {
        "max_new_tokens": 12,
        "stop_ids": frozenset({tiny_tokenizer.eos_token_id}),
        "pad_id": tiny_tokenizer.pad_token_id,
        "temperature": 0.0,
        "top_p": None,
        "top_k": None,
        "seeds": list(range(len(prompts))),
    }
    dynamic = generation.generate_batch(model, prompts, **options)
    static = generation.generate_batch(model, prompts, cache_implementation="static", **options)
    assert static == dynamic
    assert all(len(ids) > 0 for ids, _ in dynamic)


def test_prefix_batch_size_and_static_cache_reach_the_sampler_through_the_upft_block(
    questions, tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    seen = []
    real = generation.generate_batch

    def spy(model, prompts, **kwargs):
        seen.append((len(prompts), kwargs["max_new_tokens"], kwargs["cache_implementation"]))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", spy)
    upft = UPFTConfig(
        cache_dir=str(tmp_path),
        prefix_length=4,
        structure_ratio=0.25,
        sampling={
            "max_new_tokens": 12,
            "batch_size": 2,
            "prefix_batch_size": 5,
            "cache_implementation": "static",
        },
    )
    rows = build_rows(questions, tiny_tokenizer, tiny.axolotl_cfg(tiny_model), upft)
    assert len(rows) == 40
    # 30 prefixes in parts of at most prefix_batch_size (6 parts, more than the planner's 4 per kind),
    # 10 full traces in parts of at most batch_size (5 parts); static: one call per part, no pool
    assert seen == [(5, 4, "static")] * 6 + [(2, 12, "static")] * 5
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert (summary["prefix"], summary["full"]) == (30, 10)


def chain(scores, temperature, top_k, top_p):
    """transformers' own warper chain, as `generate` builds it from temperature, top_k and top_p."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return TopPLogitsWarper(top_p)(None, scores) if top_p < 1.0 else scores


@pytest.mark.parametrize(
    ("top_k", "top_p", "spread"),
    [(20, 0.8, 3.0), (20, 1.0, 3.0), (0, 0.95, 6.0), (0, 0.9, 1.0), (50, 0.5, 0.5), (0, 1.0, 3.0)],
)
def test_one_pass_warper_keeps_what_the_transformers_chain_keeps(top_k, top_p, spread):
    # spread 6: a peaked, model-like distribution (nucleus within 1024 candidates); spread 1: near-flat,
    # the nucleus spans most of the vocabulary and the warper falls back to the chain
    torch.manual_seed(0)
    scores = torch.randn(64, 151936) * spread
    fast = generation.CandidateSampler(0.6, top_k, top_p).warp(scores.clone())
    expected = chain(scores.clone(), 0.6, top_k, top_p)
    assert torch.equal(fast.isinf(), expected.isinf())
    assert torch.equal(fast[~fast.isinf()], expected[~expected.isinf()])
    kept = (~fast.isinf()).sum(-1)
    assert kept.min() >= 1 and (top_k == 0 or kept.max() <= top_k)


def test_one_pass_warper_keeps_tokens_tied_at_the_kth_value_like_the_chain_within_its_window():
    scores = torch.tensor([[4.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    fast = generation.CandidateSampler(1.0, 2, 0.99).warp(scores.clone())
    assert torch.equal(fast, chain(scores.clone(), 1.0, 2, 0.99))
    assert (~fast.isinf()).sum() == 4
    # bf16 logits tie often; ties beyond k + max(k, TIE_WINDOW) tokens are the one documented difference
    flat = torch.cat([torch.tensor([[5.0]]), torch.full((1, 40), 3.0), torch.zeros(1, 10)], dim=-1)
    kept = (~generation.CandidateSampler(1.0, 2, 1.0).warp(flat).isinf()).sum()
    assert kept == 2 + generation.TIE_WINDOW and (~chain(flat.clone(), 1.0, 2, 1.0).isinf()).sum() == 41


@pytest.mark.parametrize(("top_k", "top_p"), [(20, 0.8), (0, 0.9), (0, 1.0), (8, 1.0)])
def test_candidate_sampler_draws_from_the_warped_softmax(top_k, top_p):
    """40,000 rows of the same logits, each with its own seed, as `generate`'s logits processor."""
    torch.manual_seed(1)
    logits = torch.randn(1, 500) * 2.5
    draws = 40_000
    expected = chain(logits.clone(), 0.6, top_k, top_p).softmax(-1)[0]
    keys = generation.row_keys(list(range(draws)), "cpu")
    sampler = generation.CandidateSampler(0.6, top_k, top_p, keys, start=3)
    one_hot = sampler(torch.zeros(draws, 5, dtype=torch.long), logits.expand(draws, -1).clone())
    assert torch.equal((one_hot == 0).sum(-1), torch.ones(draws, dtype=torch.long)), "one token per row"
    assert bool(one_hot[one_hot != 0].isinf().all())
    frequency = torch.bincount(one_hot.argmax(-1), minlength=500) / draws
    assert (frequency > 0).sum() > 3, "several tokens are drawn"
    assert bool(frequency[expected == 0].eq(0).all()), "nothing outside top-k / the nucleus"
    assert (frequency - expected).abs().max() < 0.012  # ~4 standard errors at 40K draws
    untempered = chain(logits.clone(), 1.0, top_k, top_p).softmax(-1)[0]
    assert (untempered - expected).abs().max() > 0.03, "the check can tell a missing temperature apart"


def test_sampling_is_seeded_and_greedy_matches_transformers_greedy(tiny_model, tiny_tokenizer, questions):
    from axolotl_upft.prompts import chat_messages, render_prompt_ids

    model = generation.load_model(str(tiny_model), torch.device("cpu"))
    prompts = [render_prompt_ids(tiny_tokenizer, chat_messages(q["question"], None)) for q in questions[:8]]
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    options = {"max_new_tokens": 16, "stop_ids": frozenset({eos}), "pad_id": pad, "top_p": 0.9, "top_k": 20}
    first = generation.generate_batch(model, prompts, temperature=0.7, seeds=seeds(3, prompts), **options)
    assert (
        generation.generate_batch(model, prompts, temperature=0.7, seeds=seeds(3, prompts), **options)
        == first
    )
    assert (
        generation.generate_batch(model, prompts, temperature=0.7, seeds=seeds(4, prompts), **options)
        != first
    )
    ids, mask = generation.left_pad(prompts, pad, model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=16,
        eos_token_id=eos,
        pad_token_id=pad,
        do_sample=False,
        repetition_penalty=1.0,
    )
    greedy = [generation.cut_at_stop(row, frozenset({eos})) for row in out[:, ids.shape[1] :].tolist()]
    assert (
        generation.generate_batch(model, prompts, temperature=0.0, seeds=seeds(0, prompts), **options)
        == greedy
    )


def test_generation_config_repetition_penalty_is_not_applied_unless_set(
    tiny_model, tiny_tokenizer, tmp_path, questions
):
    import shutil

    from axolotl_upft.prompts import chat_messages, render_prompt_ids

    penalised = tmp_path / "penalised"
    shutil.copytree(tiny_model, penalised)
    config = json.loads((penalised / "generation_config.json").read_text())
    (penalised / "generation_config.json").write_text(json.dumps(config | {"repetition_penalty": 5.0}))
    prompts = [render_prompt_ids(tiny_tokenizer, chat_messages(q["question"], None)) for q in questions[:4]]
    options = {
        "max_new_tokens": 12,
        "stop_ids": frozenset({tiny_tokenizer.eos_token_id}),
        "pad_id": tiny_tokenizer.pad_token_id,
        "temperature": 0.0,
        "top_p": None,
        "top_k": None,
        "seeds": list(range(len(prompts))),
    }
    plain = generation.generate_batch(
        generation.load_model(str(tiny_model), torch.device("cpu")), prompts, **options
    )
    model = generation.load_model(str(penalised), torch.device("cpu"))
    assert generation.generate_batch(model, prompts, **options) == plain
    assert generation.generate_batch(model, prompts, repetition_penalty=5.0, **options) != plain


@pytest.mark.parametrize(("top_k", "top_p"), [(20, 0.8), (50, 0.95), (20, 1.0)])
def test_one_pass_warper_matches_the_chain_on_bf16_logits_full_of_ties(top_k, top_p):
    torch.manual_seed(5)
    scores = (torch.randn(256, 151936) * 2.0).bfloat16().float()  # what generate gets from a bf16 lm_head
    top = scores.topk(top_k + 1).values
    assert bool((top[:, top_k - 1] == top[:, top_k]).any()), "some rows tie at the k-th score"
    fast = generation.CandidateSampler(0.6, top_k, top_p).warp(scores.clone())
    expected = chain(scores.clone(), 0.6, top_k, top_p)
    # which of several tokens tied at the top-p boundary stays is the sort's choice in transformers too:
    # the same number of tokens, with the same scores, per row
    assert torch.equal(fast.sort(-1).values, expected.sort(-1).values)


def random_llama(vocab_size: int):
    """A 2-layer Llama with random weights: unlike the trained tiny model, its greedy tokens vary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("running", [1, 3, 8])
def test_decode_loop_refilling_finished_rows_keeps_transformers_greedy_tokens(
    tiny_tokenizer, questions, running
):
    from axolotl_upft.prompts import chat_messages, render_prompt_ids

    model = random_llama(len(tiny_tokenizer))
    prompts = [render_prompt_ids(tiny_tokenizer, chat_messages(q["question"], None)) for q in questions[:8]]
    pad = tiny_tokenizer.pad_token_id
    ids, mask = generation.left_pad(prompts, pad, model.device)
    greedy = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": pad}
    free = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, **greedy)[:, ids.shape[1] :]
    # stop ids taken from the free-running outputs, so rows stop at different steps (some never)
    stops = frozenset({tiny_tokenizer.eos_token_id, *free[:4, 3::6].flatten().tolist()})
    out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=sorted(stops), **greedy)
    expected = [generation.cut_at_stop(row, stops) for row in out[:, ids.shape[1] :].tolist()]
    assert len({len(row) for row, _ in expected}) >= 3, "rows stop at different steps"
    assert {stopped for _, stopped in expected} == {True, False}
    options = {"max_new_tokens": 20, "stop_ids": stops, "pad_id": pad, "top_p": None, "top_k": None}
    got = generation.generate_batch(
        model, prompts, temperature=0.0, seeds=seeds(0, prompts), running=running, **options
    )
    assert got == expected
    sampled = generation.generate_batch(
        model, prompts, temperature=0.7, seeds=seeds(3, prompts), running=running, **options
    )
    again = generation.generate_batch(
        model, prompts, temperature=0.7, seeds=seeds(3, prompts), running=running, **options
    )
    assert sampled == again and sampled != got


@pytest.mark.parametrize("key", ["no_repeat_ngram_size", "suppress_tokens", "bad_words_ids", "sequence_bias"])
def test_generation_config_keys_outside_upft_sampling_do_not_shape_the_hf_draw(
    key, tiny_model, tiny_tokenizer, tmp_path, questions
):
    import shutil

    from transformers import GenerationConfig

    from axolotl_upft.prompts import chat_messages, render_prompt_ids

    prompts = [render_prompt_ids(tiny_tokenizer, chat_messages(q["question"], None)) for q in questions[:4]]
    eos = tiny_tokenizer.eos_token_id
    options = {
        "max_new_tokens": 12,
        "stop_ids": frozenset({eos}),
        "pad_id": tiny_tokenizer.pad_token_id,
        "top_p": None,
        "top_k": None,
    }
    plain_model = generation.load_model(str(tiny_model), torch.device("cpu"))
    greedy = generation.generate_batch(
        plain_model, prompts, temperature=0.0, seeds=seeds(0, prompts), **options
    )
    sampled = generation.generate_batch(
        plain_model, prompts, temperature=0.7, seeds=seeds(3, prompts), **options
    )
    drawn = sorted({t for ids, _ in greedy + sampled for t in ids} - {eos})
    assert any(len(set(ids)) < len(ids) for ids, _ in greedy), "greedy repeats a token: n-gram blocking shows"
    value = {
        "no_repeat_ngram_size": 1,
        "suppress_tokens": drawn,
        "bad_words_ids": [[t] for t in drawn],
        "sequence_bias": [[[t], -100.0] for t in drawn],
    }[key]
    shaped = tmp_path / "shaped"
    shutil.copytree(tiny_model, shaped)
    config = json.loads((shaped / "generation_config.json").read_text())
    (shaped / "generation_config.json").write_text(json.dumps(config | {key: value}))
    model = generation.load_model(str(shaped), torch.device("cpu"))
    assert (
        generation.generate_batch(model, prompts, temperature=0.0, seeds=seeds(0, prompts), **options)
        == greedy
    )
    assert (
        generation.generate_batch(model, prompts, temperature=0.7, seeds=seeds(3, prompts), **options)
        == sampled
    )
    # the same key, as transformers applies it from the file, changes the greedy draw
    ids, mask = generation.left_pad(prompts, options["pad_id"], model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        eos_token_id=eos,
        pad_token_id=options["pad_id"],
        do_sample=False,
        generation_config=GenerationConfig.from_pretrained(shaped),
    )
    assert [
        generation.cut_at_stop(row, frozenset({eos})) for row in out[:, ids.shape[1] :].tolist()
    ] != greedy
