"""How the generation loop cuts requests into parts and deals them to sampling workers: by estimated decode
cost, each worker about 1/N of every kind, parts small enough that a crash loses little, and a real
4-rank run whose generated tokens, counted from the cache, come out even."""

import json
import random
from pathlib import Path

import pytest
import tiny
import yaml

from axolotl_upft.cache import FORMAT, UNKNOWN_RANK, Record, SampleCache
from axolotl_upft.loop import PARTS_PER_RANK, Prompt, cost, deal, pending, plan_batches, split
from axolotl_upft.rows import FULL, PREFIX, question_kinds

LIMITS = {PREFIX: 32, FULL: 1024}


def requests(n: int, ratio: float, seed: int = 0) -> list[Prompt]:
    """`n` questions of the real structure split, prompts of 40..250 tokens."""
    rng = random.Random(seed)
    kinds = question_kinds(n, ratio, 42)
    return [Prompt(i, [1] * rng.randint(40, 250), kind) for i, kind in enumerate(kinds)]


def shares(parts, owners, workers: int) -> tuple[list[float], list[dict[str, int]]]:
    """Each worker's estimated cost and its requests of each kind."""
    load = [0.0] * workers
    counts = [{PREFIX: 0, FULL: 0} for _ in range(workers)]
    for part, w in zip(parts, owners):
        load[w] += cost(part, LIMITS)
        counts[w][part[0].kind] += len(part)
    return load, counts


def test_four_workers_get_even_cost_and_about_a_quarter_of_each_kind():
    reqs = requests(200, 0.25)
    parts = plan_batches(reqs, list(LIMITS), 4, {})
    load, counts = shares(parts, deal(parts, LIMITS, 4), 4)
    mean = sum(load) / 4
    assert all(abs(x - mean) <= 0.15 * mean for x in load), load
    for kind in (PREFIX, FULL):
        n = sum(r.kind == kind for r in reqs)
        assert all(abs(c[kind] - n / 4) <= 0.15 * n / 4 for c in counts), (kind, counts)


def test_parts_are_small_and_each_worker_gets_as_many_so_a_crash_loses_one_small_part():
    reqs = requests(200, 0.25)
    parts = plan_batches(reqs, list(LIMITS), 4, {})
    owners = deal(parts, LIMITS, 4)
    for kind in (PREFIX, FULL):
        n = sum(r.kind == kind for r in reqs)
        sizes = [len(p) for p in parts if p[0].kind == kind]
        assert max(sizes) == -(-n // (4 * PARTS_PER_RANK)) and max(sizes) - min(sizes) <= 1
        assert sorted(o for p, o in zip(parts, owners) if p[0].kind == kind) == sorted(
            list(range(4)) * PARTS_PER_RANK
        ), "a worker's share of a kind is PARTS_PER_RANK parts: a crash loses at most one of them"
    assert sorted(r.index for p in parts for r in p) == list(range(200))
    assert all(len({r.kind for r in p}) == 1 for p in parts)


def test_a_cap_makes_more_parts_in_a_multiple_of_the_workers():
    reqs = requests(200, 0.25)
    parts = plan_batches(reqs, list(LIMITS), 4, {PREFIX: 5, FULL: 100})
    prefix = [len(p) for p in parts if p[0].kind == PREFIX]
    assert max(prefix) <= 5 and len(prefix) % 4 == 0 and len(prefix) == 4 * 8, "150 prefixes: 8 parts each"
    assert len([p for p in parts if p[0].kind == FULL]) == 4 * PARTS_PER_RANK, "a loose cap changes nothing"


def test_the_plan_reads_no_cache_and_a_resume_deals_what_is_left_evenly():
    reqs = requests(200, 0.25)
    parts = plan_batches(reqs, list(LIMITS), 4, {})
    clean = deal(parts, LIMITS, 4)
    # worker 2 died after writing none of its parts; the others finished theirs
    done = {r.index: None for p, w in zip(parts, clean) if w != 2 for r in p}
    left = pending(parts, done)
    assert left == [p for p, w in zip(parts, clean) if w == 2], "whole parts of the clean plan, none re-cut"
    load, counts = shares(left, deal(left, LIMITS, 4), 4)
    assert max(load) <= 1.15 * sum(load) / 4, "the dead worker's share is spread over all four"
    assert all(c[PREFIX] and c[FULL] for c in counts), counts
    # a part left half-done keeps the rest of its requests together
    half = {r.index: None for r in parts[0][: len(parts[0]) // 2]}
    assert pending(parts, half)[0] == parts[0][len(parts[0]) // 2 :]


def test_one_worker_takes_every_part_and_ties_go_to_the_lower_worker():
    reqs = requests(40, 0.25)
    parts = plan_batches(reqs, list(LIMITS), 1, {})
    assert deal(parts, LIMITS, 1) == [0] * len(parts) == [0] * (2 * PARTS_PER_RANK)
    same = [[Prompt(i, [1], PREFIX)] for i in range(6)]
    assert deal(same, LIMITS, 4) == [0, 1, 2, 3, 0, 1] == deal(same, LIMITS, 4)


def test_fewer_requests_than_parts_make_one_part_each_and_unknown_kinds_are_refused():
    reqs = [Prompt(i, [1], PREFIX) for i in range(3)]
    assert [len(p) for p in plan_batches(reqs, list(LIMITS), 4, {})] == [1, 1, 1]
    assert [len(p) for p in split(list(range(10)), 4)] == [3, 3, 2, 2]
    with pytest.raises(RuntimeError, match="no token limit for request kinds"):
        plan_batches(reqs, [FULL], 4, {})


def tokens_by_rank(cache_root: Path) -> dict[int, int]:
    """Generated tokens per rank from the one run folder under `cache_root`."""
    (run_dir,) = cache_root.iterdir()
    key = json.loads((run_dir / "meta.json").read_text())["key"]
    return SampleCache(cache_root, key, {}).tokens_by_rank()


def sample_on_ranks(tmp: Path, model: Path, questions: list[dict], ranks: int) -> dict[int, int]:
    """`axolotl-upft sample` on `ranks` torchrun ranks (gloo, CPU, hf loop) over `questions` at p = 0.25,
    prefixes of 4 tokens and full traces of at most 32; each rank's generated tokens from the cache."""
    from test_distributed import free_port, run, sample_config, torchrun

    config = sample_config(
        tmp, model, questions, f"ranks{ranks}", prefix_length=4, sampling={"max_new_tokens": 32}
    )
    (config.parent / "questions.jsonl").write_text(
        "".join(json.dumps({"question": q["question"]}) + "\n" for q in questions)
    )
    cfg = yaml.safe_load(config.read_text())
    assert cfg["upft"]["structure_ratio"] == 0.25
    out = run(torchrun("--nproc_per_node", str(ranks), "--master_port", str(free_port())) + [str(config)])
    assert f'"questions": {len(questions)}' in out
    return tokens_by_rank(config.parent / "samples")


@pytest.mark.slow
def test_four_ranks_generate_even_token_counts_on_200_questions(tmp_path, tiny_model):
    tokens = sample_on_ranks(tmp_path, tiny_model, tiny.gsm8k_questions(200), 4)
    assert sorted(tokens) == [0, 1, 2, 3], tokens
    mean = sum(tokens.values()) / 4
    assert all(abs(t - mean) <= 0.15 * mean for t in tokens.values()), tokens


def test_part_files_name_their_rank_and_older_ones_stay_readable(tmp_path):
    cache = SampleCache(tmp_path, "k" * 64, {})
    cache.open()
    for rank, (index, ids) in enumerate([(0, [1, 2, 3]), (1, [4])]):
        cache.rank = rank
        cache.write_part([Record(index, PREFIX, "q", ids, True)])
    old = {"format": FORMAT, "key": cache.key, "count": 1}  # written before headers named a rank
    record = {"i": 2, "kind": FULL, "q": "q", "ids": [5, 6], "stop": False}
    (cache.dir / "part-old-1.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(record) + "\n")
    assert cache.tokens_by_rank() == {0: 3, 1: 1, UNKNOWN_RANK: 2}
    assert sorted(cache.load()) == [0, 1, 2]
