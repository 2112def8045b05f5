"""This process's share of a generation run: rank, world size and collectives over ranks."""

import os
from dataclasses import dataclass

# `axolotl-upft sample` puts its Distributed in the cfg under this key; `preprocess` and `train` sample on
# one process (Axolotl locks data preparation), so without it the dataset samples alone.
CFG_KEY = "upft_distributed"


@dataclass
class Distributed:
    """Rank, world size and a barrier over ranks; the defaults are one process."""

    rank: int = 0
    world_size: int = 1
    group_initialized: bool = False

    @classmethod
    def from_env(cls) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), True)

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
