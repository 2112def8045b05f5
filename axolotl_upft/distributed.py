"""This process's share of a generation run: rank, world size, collectives over ranks, and the heartbeat
that tells ranks waiting for its files that it still works."""

import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Self

from .cache import atomic_write_text

# sample_datasets (workers.py) puts this rank's Distributed in the cfg under this key while it samples;
# without it (Axolotl's own data preparation, on one process) the dataset samples alone from the cache.
CFG_KEY = "upft_distributed"
DDP_TIMEOUT = 1800  # seconds: Axolotl's (and transformers') default `ddp_timeout`


def ddp_timeout(cfg=None) -> int:
    """Axolotl's rule: AXOLOTL_NCCL_TIMEOUT (which its load_cfg sets from `ddp_timeout`), else the config's
    `ddp_timeout`, else 1800 s."""
    return int(os.environ.get("AXOLOTL_NCCL_TIMEOUT") or (cfg or {}).get("ddp_timeout") or DDP_TIMEOUT)


@dataclass(frozen=True)
class EngineGroup:
    """One rank's place among the engines of its node: `devices` (node-local indices) are its engine's, and
    only the rank that `starts` it samples; the others of the group wait while it uses their GPUs."""

    devices: tuple[int, ...]
    starts: bool
    index: int  # of the engine on its node
    per_node: int  # engines on a node


def engine_group(node_size: int, local_rank: int, tensor_parallel_size: int) -> EngineGroup:
    """Groups of `tensor_parallel_size` consecutive local ranks (one process per GPU, as launchers start
    them) share one engine on their GPUs; the first of each group starts it. A node of one process owns
    every device it sees: its engine takes the first `tensor_parallel_size` of them."""
    tp = tensor_parallel_size
    if node_size == 1:
        return EngineGroup(tuple(range(tp)), True, 0, 1)
    if node_size % tp:
        raise ValueError(
            f"upft.sampling.tensor_parallel_size: {tp} does not divide the {node_size} processes of a node "
            "(LOCAL_WORLD_SIZE, one per GPU), so some GPUs would be left out of every engine. Start a "
            f"multiple of {tp} processes per node, or set tensor_parallel_size to a divisor of {node_size}."
        )
    if not 0 <= local_rank < node_size:
        raise RuntimeError(f"local rank {local_rank} outside a node of {node_size} processes")
    index = local_rank // tp
    devices = tuple(range(index * tp, (index + 1) * tp))
    return EngineGroup(devices, local_rank % tp == 0, index, node_size // tp)


def node_size(env=os.environ) -> int:
    """Processes on this node: torchrun's and accelerate's LOCAL_WORLD_SIZE, the DeepSpeed launcher's
    LOCAL_SIZE, else every rank (one node)."""
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("WORLD_SIZE", "1"))


def worker_layout(env, tensor_parallel_size: int) -> tuple[int | None, int]:
    """(this rank's index among the ranks that start an engine, or None if it only waits; how many engines
    sample over all nodes), from a launcher's variables. Nodes are alike and ranks numbered node by node."""
    world_size, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    size = node_size(env)
    group = engine_group(size, int(env.get("LOCAL_RANK", "0")), tensor_parallel_size)
    node = int(env.get("GROUP_RANK") or rank // size)
    worker = node * group.per_node + group.index if group.starts else None
    return worker, world_size // size * group.per_node


@dataclass
class Distributed:
    """Rank, world size and a barrier over ranks; the defaults are one process. `timeout` (seconds) bounds
    every collective and how long a rank may go silent while others wait for its files. `layout` is
    `worker_layout`'s; None means every rank starts an engine of its own."""

    rank: int = 0
    world_size: int = 1
    group_initialized: bool = False  # this object started the process group (and `close` ends it)
    timeout: float = DDP_TIMEOUT
    layout: tuple[int | None, int] | None = None

    @classmethod
    def from_env(cls, timeout: float = DDP_TIMEOUT, tensor_parallel_size: int = 1) -> "Distributed":
        """The launcher's ranks (torchrun, accelerate, the DeepSpeed launcher, or `workers.run_workers`). A
        process group that already exists (accelerate's) is joined and left to its owner."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(timeout=timeout)
        import torch.distributed as dist

        layout = worker_layout(os.environ, tensor_parallel_size)
        started = not dist.is_initialized()
        if started:
            start_group(timeout)
        return cls(dist.get_rank(), dist.get_world_size(), started, timeout, layout)

    @property
    def worker(self) -> int | None:
        """This rank's index among the ranks that sample, or None if it only waits (its GPU serves another
        rank's tensor-parallel engine)."""
        return self.rank if self.layout is None else self.layout[0]

    @property
    def workers(self) -> int:
        """Ranks that sample: one per engine, over all nodes."""
        return self.world_size if self.layout is None else self.layout[1]

    @property
    def poll_seconds(self) -> float:
        """How often a waiting rank looks for files and a working rank shows it is alive."""
        return min(10.0, self.timeout / 10)

    @classmethod
    def from_cfg(cls, cfg) -> "Distributed":
        return cfg.get(CFG_KEY) or cls()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def minimum(self, values: dict[str, int]) -> dict[str, int]:
        """The smallest of each value over ranks, so ranks on different GPUs still plan the same batches."""
        if self.world_size == 1 or not values:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(list(values.values()), dtype=torch.long, device=rank_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return dict(zip(values, tensor.tolist()))

    def broadcast(self, value: str) -> str:
        """Rank 0's `value` on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=rank_device())
        return box[0]

    def close(self) -> None:
        if self.group_initialized:
            import torch.distributed as dist

            dist.destroy_process_group()


def rank_device():
    """This rank's GPU (LOCAL_RANK), or the CPU: where its collectives' tensors live."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def start_group(timeout: float) -> None:
    """gloo on CPU; on GPUs nccl bound to this rank's device (set first), so no collective guesses it."""
    import torch
    import torch.distributed as dist

    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))


class Heartbeat:
    """Rewrites `path` every `interval` seconds from a thread while this rank works, so a rank waiting for its
    files can tell a slow rank from a dead or frozen one; the file goes when the work is done."""

    def __init__(self, path: Path, interval: float):
        self.path, self.interval = path, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {path.name}", daemon=True)
        self._count = 0

    def __enter__(self) -> Self:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _beat(self) -> None:
        self._count += 1
        atomic_write_text(self.path, f"{os.getpid()} {self._count}\n")
