"""This process's share of a generation run: rank, world size, collectives over ranks, and the heartbeat
that tells ranks waiting for its files that it still works."""

import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Self

from .cache import atomic_write_text

# `axolotl-upft sample` puts its Distributed in the cfg under this key; `preprocess` and `train` sample on
# one process (Axolotl locks data preparation), so without it the dataset samples alone.
CFG_KEY = "upft_distributed"
DDP_TIMEOUT = 1800  # seconds: Axolotl's (and transformers') default `ddp_timeout`


def ddp_timeout(cfg=None) -> int:
    """Axolotl's rule: AXOLOTL_NCCL_TIMEOUT (which its load_cfg sets from `ddp_timeout`), else the config's
    `ddp_timeout`, else 1800 s."""
    return int(os.environ.get("AXOLOTL_NCCL_TIMEOUT") or (cfg or {}).get("ddp_timeout") or DDP_TIMEOUT)


@dataclass
class Distributed:
    """Rank, world size and a barrier over ranks; the defaults are one process. `timeout` (seconds) bounds
    every collective and how long a rank may go silent while others wait for its files."""

    rank: int = 0
    world_size: int = 1
    group_initialized: bool = False
    timeout: float = DDP_TIMEOUT

    @classmethod
    def from_env(cls, timeout: float = DDP_TIMEOUT) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(timeout=timeout)
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        return cls(dist.get_rank(), dist.get_world_size(), True, timeout)

    @property
    def workers(self) -> int:
        """How many ranks sample (generate_all deals its parts over these)."""
        return self.world_size

    @property
    def worker(self) -> int | None:
        """This rank's index among the sampling workers; None if it only waits for their part files."""
        return self.rank

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

        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else "cpu"
        tensor = torch.tensor(list(values.values()), dtype=torch.long, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return dict(zip(values, tensor.tolist()))

    def close(self) -> None:
        if self.group_initialized:
            import torch.distributed as dist

            dist.destroy_process_group()


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
