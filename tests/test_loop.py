"""The one generation loop: parts, resume that draws exactly the samples of a clean run."""

import json
import sys
import threading
import time

import pytest
import tiny
import torch

from axolotl_upft import generation
from axolotl_upft.args import UPFTConfig
from axolotl_upft.cache import Record, SampleCache
from axolotl_upft.dataset import build_rows
from axolotl_upft.distributed import CFG_KEY, Distributed, Heartbeat
from axolotl_upft.loop import Prompt, pending, plan_batches, request_seed, wait_for_ranks
from axolotl_upft.rows import PREFIX


def test_cached_requests_are_skipped_but_the_rest_of_their_part_stays_together():
    requests = [Prompt(i, [1] * (i + 1), PREFIX) for i in range(8)]
    parts = plan_batches(requests, [PREFIX], 1, {PREFIX: 2})
    assert parts == [requests[0:2], requests[2:4], requests[4:6], requests[6:8]]
    done = {0: None, 4: None, 5: None}
    # part [4, 5] is finished and skipped; [0, 1] keeps its place as [1]
    assert pending(parts, done) == [requests[1:2], requests[2:4], requests[6:8]]


def test_a_request_seed_is_its_runs_seed_and_index_only_in_the_range_torch_and_vllm_take():
    seeds = [request_seed(42, i) for i in range(10_000)]
    assert len(set(seeds)) == len(seeds), "every request its own stream"
    assert all(0 <= s < 2**63 for s in seeds) and max(seeds) > 2**62, "63 bits used, within int64"
    assert request_seed(42, 7) == request_seed(42, 7) != request_seed(43, 7)
    torch.Generator().manual_seed(max(seeds))  # torch (vLLM's per-request generators) takes it


def cached_samples(cache_root) -> dict[int, list[int]]:
    (run_dir,) = cache_root.iterdir()
    lines = [line for part in run_dir.glob("part-*.jsonl") for line in part.read_text().splitlines()[1:]]
    return {record["i"]: record["ids"] for record in map(json.loads, lines)}


def test_a_resumed_run_draws_the_samples_of_a_clean_run_with_memory_sized_batches(
    questions, tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    # Batch sizes from the widest prompt, as on a GPU: 1 row when a prompt is 100+ tokens wide, else 5. The
    # 12 prefix questions are 29..107 tokens wide: parts of 1 (12 of them), not the 4 parts of 3 that a
    # cap of 5 would make. POOL 1: each call is one batch.
    monkeypatch.setattr(generation, "POOL", 1)
    monkeypatch.setattr(
        generation,
        "memory_fits",
        lambda backend, model, widths, limits: {k: 1 if w >= 100 else 5 for k, w in widths.items()},
    )
    upft = UPFTConfig(prefix_length=4, structure_ratio=0.25, sampling={"max_new_tokens": 12})

    def run(cache):
        cfg = tiny.axolotl_cfg(tiny_model)
        cfg[CFG_KEY] = Distributed()
        return build_rows(
            questions[:16], tiny_tokenizer, cfg, upft.model_copy(update={"cache_dir": str(cache)})
        )

    clean = run(tmp_path / "clean")
    assert len(cached_samples(tmp_path / "clean")) == 16
    write_part, written = SampleCache.write_part, []

    def killed_after_three(cache, records):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        written.append(write_part(cache, records))

    monkeypatch.setattr(SampleCache, "write_part", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    assert len(cached_samples(tmp_path / "resumed")) == 3, "three parts of one prefix each"
    monkeypatch.setattr(SampleCache, "write_part", write_part)
    resumed = run(tmp_path / "resumed")
    assert cached_samples(tmp_path / "resumed") == cached_samples(tmp_path / "clean")
    assert resumed == clean


def test_a_batch_halved_after_running_out_of_memory_keeps_each_prompts_seed(monkeypatch):
    seen = []

    def generate_batch(model, prompts, *, seeds, **kwargs):
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        # no exception being handled: its traceback would keep the failed batch's tensors alive
        assert sys.exc_info()[0] is None, "the halves run outside the except block"
        seen.append(seeds)
        return [([prompt[0], seed], True) for prompt, seed in zip(prompts, seeds)]

    monkeypatch.setattr(generation, "generate_batch", generate_batch)
    sampler = generation.HFSampler(model=None)
    prompts = [[p] for p in range(5)]
    out = sampler.generate(prompts, seeds=[100, 101, 102, 103, 104], max_new_tokens=4)
    # 5 -> 2 + 3; 3 -> 1 + 2
    assert seen == [[100, 101], [102], [103, 104]]
    assert out == [([p, 100 + p], True) for p in range(5)], "each prompt's own seed, in order"


def opened_cache(tmp_path) -> SampleCache:
    cache = SampleCache(tmp_path, "k" * 64, {})
    cache.open()
    return cache


def test_a_waiting_rank_outwaits_a_slow_rank_as_long_as_its_heartbeat_goes_on(tmp_path):
    cache = opened_cache(tmp_path)
    rank0 = Distributed(0, 2, timeout=0.3)
    late = threading.Timer(1.0, cache.write_part, [[Record(7, "prefix", "q", [1], True)]])
    started = time.monotonic()
    with Heartbeat(cache.heartbeat_path(1), interval=0.03):
        late.start()
        wait_for_ranks({cache.part_path([7]): 1}, cache, rank0, "test")
    assert time.monotonic() - started > 0.9, "returned only once rank 1's part file was there"
    assert not cache.heartbeat_path(1).exists(), "a rank that is done leaves no heartbeat behind"


def test_a_rank_whose_heartbeat_stands_still_is_named_once_the_timeout_has_passed(tmp_path):
    cache = opened_cache(tmp_path)
    cache.heartbeat_path(1).write_text("left by a killed run")
    owed = {cache.part_path([1, 2]): 0, cache.part_path([3, 4]): 1, cache.part_path([5, 6]): 1}
    cache.write_part([Record(i, "prefix", "q", [1], True) for i in (1, 2)])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 still owes 2 batches .* for 0.3 s.* raise `ddp_timeout`"):
        wait_for_ranks(owed, cache, Distributed(0, 2, timeout=0.3), "test")
    assert 0.3 < time.monotonic() - started < 2
