"""The one generation loop of self-sampling, evaluation and the prefix analysis.

Plan parts over *all* requests (sized from their number and the workers'), skip what the cache holds,
deal the rest to the sampling workers by estimated decode cost, seed each request, generate, write a part
file, wait for the other workers' part files (polling the cache, not in a collective that times out),
load, check the prompt digests. The callers differ only in what a request is and what
becomes of its record. A plan never depends on what is cached, so a resumed run draws the samples a
clean run would have drawn.
"""

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from .cache import Record, SampleCache, digest, ids_digest
from .distributed import Distributed, Heartbeat
from .logs import get_logger

LOG = get_logger(__name__)
LOG_SECONDS = 60  # how often rank 0 says whom it waits for
# Parts of each kind per sampling worker. A crash loses at most the part a worker was writing: a quarter of
# its share. More parts would lose less, but each part is one engine call that ends with a tail in which
# the batch drains (the longest trace decides its length), and a part of full traces is already ~1/4 of
# a worker's few hundred on GSM8K at 8 GPUs: 8 would halve the batch vLLM can keep running.
PARTS_PER_RANK = 4
# A prompt token's cost against a generated one's: the prefill runs a whole prompt in one forward pass.
PROMPT_WEIGHT = 0.1


class Request(Protocol):
    """One generation: `index` names it in the cache, `kind` picks its batch size and token limit."""

    index: int
    prompt_ids: list[int]
    kind: str


class Generator(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        *,
        seeds: list[int],
        max_new_tokens: int,
        part_cap: int | None,
        **options,
    ) -> list:
        """One (generated ids, stopped) pair per prompt, each drawn from its own seed (`request_seed`).
        `part_cap` is the most prompts a part of this kind may hold (None: no cap), which sizes the hf
        loop's running rows however small this part is."""

    def close(self) -> None:
        """Free the model (and stop an engine) once this rank's batches are written."""


@dataclass(frozen=True)
class Prompt:
    """A request that is only a prompt (evaluation, analysis)."""

    index: int
    prompt_ids: list[int]
    kind: str


@dataclass
class Generated:
    records: dict[int, Record]  # one per request, by index
    cached: int  # requests that had a record before this run
    new_tokens: int  # generated in this run, by every rank
    seconds: float


def plan_batches(
    requests: Sequence[Request], kinds: Sequence[str], workers: int, caps: dict[str, int]
) -> list[list[Request]]:
    """Each kind apart, in the order of `kinds` (prefixes first: they stop at k), length-sorted to cut
    padding, cut into `part_count` parts of near-equal size. From every request, never from the cache, so
    a resumed run keeps the parts of a clean one."""
    unknown = {r.kind for r in requests} - set(kinds)
    if unknown:
        raise RuntimeError(f"no token limit for request kinds {sorted(unknown)}")
    parts = []
    for kind in kinds:
        group = sorted((r for r in requests if r.kind == kind), key=lambda r: (len(r.prompt_ids), r.index))
        parts += split(group, part_count(len(group), workers, caps.get(kind)))
    return parts


def part_count(n: int, workers: int, cap: int | None) -> int:
    """How many parts one kind's `n` requests make: PARTS_PER_RANK per worker, more if a part would pass
    `cap` (the memory's or the user's batch size; None: no cap), always a multiple of `workers` so each
    gets as many; at most one part per request."""
    per_worker = PARTS_PER_RANK if cap is None else max(PARTS_PER_RANK, -(-n // (cap * workers)))
    return min(n, workers * per_worker)


def split(group: list, count: int) -> list[list]:
    """`group` in `count` consecutive slices whose sizes differ by at most one, the larger first."""
    size, extra = divmod(len(group), count) if count else (0, 0)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [group[a:b] for a, b in itertools.pairwise(bounds)]


def cost(part: Sequence[Request], limits: dict[str, int]) -> float:
    """A part's estimated decode cost: its requests' token limits, each prompt token at PROMPT_WEIGHT."""
    return sum(limits[r.kind] + PROMPT_WEIGHT * len(r.prompt_ids) for r in part)


def deal(parts: list[list[Request]], limits: dict[str, int], workers: int) -> list[int]:
    """The worker of each part, so every worker gets about 1/N of each kind and of the total cost.
    Kind by kind, the costliest kind first, in rounds: a round gives each worker one part (fewer in the
    last), the costliest part to the worker with the least cost so far (longest processing time first;
    ties to the lower worker). The same on every rank: it reads only the plan and what the cache held."""
    owner = [0] * len(parts)
    load = [0.0] * workers
    costs = [cost(part, limits) for part in parts]
    by_kind: dict[str, list[int]] = {}
    for j, part in enumerate(parts):
        by_kind.setdefault(part[0].kind, []).append(j)
    for kind in sorted(by_kind, key=lambda k: (-sum(costs[j] for j in by_kind[k]), k)):
        order = sorted(by_kind[kind], key=lambda j: (-costs[j], j))
        for start in range(0, len(order), workers):
            free = sorted(range(workers), key=lambda w: (load[w], w))
            for j, w in zip(order[start : start + workers], free):
                owner[j] = w
                load[w] += costs[j]
    return owner


SEED_BITS = 63  # torch's and vLLM's seeds are int64 (vLLM passes them to torch.Generator.manual_seed)


def request_seed(seed: int, index: int) -> int:
    """The seed of one request: the run's seed and the request's index (question and sample) and nothing
    else, so a sample is the same for any batch size, plan, rank count or resume."""
    return int(digest([seed, index]), 16) % 2**SEED_BITS


def widths(requests: Sequence[Request]) -> dict[str, int]:
    """The widest prompt of each kind, over every request (cached or not), for memory-based batch sizes."""
    out: dict[str, int] = {}
    for r in requests:
        out[r.kind] = max(out.get(r.kind, 0), len(r.prompt_ids))
    return out


def widest(requests: Sequence[Request]) -> int:
    """The longest prompt of any request."""
    return max(len(r.prompt_ids) for r in requests)


def context_cut(requests: Sequence[Request], records: dict[int, Record], length: int | None) -> int:
    """Generations that ran into the end of an engine context of `length` positions before a stop id."""
    if length is None:
        return 0
    return sum(
        not records[r.index].stopped and len(r.prompt_ids) + len(records[r.index].ids) >= length
        for r in requests
    )


def longest(requests: Sequence[Request], limits: dict[str, int]) -> int:
    """The longest prompt + generation of any request: what an engine's context must hold."""
    return max(len(r.prompt_ids) + limits[r.kind] for r in requests)


def check_records(records: dict[int, Record], requests: Sequence[Request], cache: SampleCache) -> None:
    """A cached record must have been generated for the very prompt and kind it is now read for."""
    for r in requests:
        record = records.get(r.index)
        if record is not None and (record.prompt_digest != ids_digest(r.prompt_ids) or record.kind != r.kind):
            raise RuntimeError(
                f"{cache.dir}: the cached generation of request {r.index} was made for another prompt. "
                f"Delete {cache.dir} to generate again."
            )


def pending(batches: list[list[Request]], done: dict[int, Record]) -> list[list[Request]]:
    """The requests still to generate of every planned part with work left."""
    return [missing for batch in batches if (missing := [r for r in batch if r.index not in done])]


def generate_all(
    requests: Sequence[Request],
    cache: SampleCache,
    load: Callable[[], Generator],
    *,
    sizes: dict[str, int],
    limits: dict[str, int],
    options: dict,
    seed: int,
    dist: Distributed,
    desc: str,
) -> Generated:
    """Generate what the cache lacks (this worker's share of parts); return every request's record. `sizes`
    caps a part's requests per kind (the memory's or the user's batch size); a kind it lacks has no cap."""
    started = time.perf_counter()
    done = cache.load()
    check_records(done, requests, cache)
    dist.barrier()
    cached = sum(r.index in done for r in requests)
    work = pending(plan_batches(requests, list(limits), dist.workers, sizes), done)
    owners = deal(work, limits, dist.workers)
    owed = {cache.part_path([r.index for r in part]): w for part, w in zip(work, owners)}
    mine = [part for part, w in zip(work, owners) if w == dist.worker]
    if mine:
        LOG.info(
            "%s: %d of %d to generate (%d cached), %d parts on worker %d of %d (rank %d)",
            desc,
            sum(len(b) for b in mine),
            len(requests),
            cached,
            len(mine),
            dist.worker,
            dist.workers,
            dist.rank,
        )
        total = len(requests) - cached
        cache.rank = dist.rank
        with Heartbeat(cache.heartbeat_path(dist.worker), dist.poll_seconds):
            run_batches(
                mine,
                cache,
                load,
                limits,
                options,
                seed=seed,
                caps=sizes,
                show=dist.rank == 0,
                desc=desc,
                total=total,
                before=len(done),
            )
    wait_for_ranks(owed, cache, dist, desc)
    records = cache.load()
    check_records(records, requests, cache)
    lacking = [r.index for r in requests if r.index not in records]
    if lacking:
        raise RuntimeError(f"{desc}: requests {lacking[:10]} have no generation in {cache.dir}")
    new_tokens = sum(len(records[r.index].ids) for r in requests if r.index not in done)
    by_index = {r.index: records[r.index] for r in requests}
    return Generated(by_index, cached, new_tokens, time.perf_counter() - started)


def wait_for_ranks(owed: dict[Path, int], cache: SampleCache, dist: Distributed, desc: str) -> None:
    """Poll the cache until every part (part file -> worker it was dealt to) is written. No collective waits,
    so the slowest worker may take as long as it needs; a worker that still owes parts and has not touched
    its heartbeat (named by its worker index) for `dist.timeout` seconds is taken for dead."""
    seen: dict[int, tuple[str | None, float]] = {}
    logged = -LOG_SECONDS
    while missing := unwritten(owed, cache.dir):
        now = time.monotonic()
        for rank in sorted(set(missing.values())):
            beat = read_heartbeat(cache.heartbeat_path(rank))
            if rank not in seen or seen[rank][0] != beat:
                seen[rank] = (beat, now)
            elif now - seen[rank][1] > dist.timeout:
                raise RuntimeError(silent_rank_error(rank, missing, cache, dist.timeout, desc))
        if dist.rank == 0 and now - logged >= LOG_SECONDS:
            LOG.info(
                "%s: waiting for %d batches of ranks %s", desc, len(missing), sorted(set(missing.values()))
            )
            logged = now
        time.sleep(dist.poll_seconds)


def unwritten(owed: dict[Path, int], folder: Path) -> dict[Path, int]:
    """The owed part files not yet in `folder`, from one directory read (not a stat per file)."""
    present = set(os.listdir(folder)) if folder.is_dir() else set()
    return {path: rank for path, rank in owed.items() if path.name not in present}


def read_heartbeat(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def silent_rank_error(
    rank: int, missing: dict[Path, int], cache: SampleCache, timeout: float, desc: str
) -> str:
    owed = sorted(path.name for path, owner in missing.items() if owner == rank)
    return (
        f"{desc}: rank {rank} still owes {len(owed)} batches ({', '.join(owed[:3])}"
        f"{', ...' if len(owed) > 3 else ''}) but has not rewritten {cache.heartbeat_path(rank)} for "
        f"{timeout:g} s: it died or froze. Run the same command again: it resumes from the batches in "
        f"{cache.dir}. If that rank is only stalled (a slow shared filesystem), raise `ddp_timeout`."
    )


def run_batches(
    mine,
    cache: SampleCache,
    load: Callable[[], Generator],
    limits,
    options,
    *,
    seed,
    caps,
    show,
    desc,
    total,
    before,
) -> None:
    """Load the model, generate and write this rank's batches, close the model (and its engine) again; the
    progress bar counts every rank's part files."""
    model = load()
    try:
        write_batches(
            mine,
            cache,
            model,
            limits,
            options,
            seed=seed,
            caps=caps,
            bar=tqdm(total=total, desc=desc, unit="q", disable=not show),
            total=total,
            before=before,
        )
    finally:
        model.close()


def write_batches(
    mine, cache: SampleCache, model: Generator, limits, options, *, seed, caps, bar, total, before
) -> None:
    started, new_tokens = time.perf_counter(), 0
    for batch in mine:
        outputs = model.generate(
            [r.prompt_ids for r in batch],
            seeds=[request_seed(seed, r.index) for r in batch],
            max_new_tokens=limits[batch[0].kind],
            part_cap=caps.get(batch[0].kind),
            **options,
        )
        records = [
            Record(r.index, r.kind, ids_digest(r.prompt_ids), ids, stopped)
            for r, (ids, stopped) in zip(batch, outputs)
        ]
        cache.write_part(records)
        new_tokens += sum(len(r.ids) for r in records)
        bar.update(max(0, min(total, cache.count_done() - before) - bar.n))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
    bar.close()
