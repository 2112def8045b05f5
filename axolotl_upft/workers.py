"""Who samples: every rank of a launcher, or child processes that one process starts, one per engine.

`axolotl preprocess` is one process, and under a launcher Axolotl prepares data on the first process while
the others wait. So the plugin's load_datasets hook samples first, on every GPU there is, and Axolotl then
builds its rows from the complete cache."""

import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .args import UPFTConfig, upft_dataset_entries
from .distributed import CFG_KEY, Distributed, ddp_timeout
from .logs import get_logger

LOG = get_logger(__name__)
LOG_TAIL = 40  # lines of a failed worker's log shown in the error
SHARED_WAIT = 5.0  # seconds a rank looks for rank 0's file (a network filesystem may show it late)


def launched() -> bool:
    """Started by torchrun, accelerate or the DeepSpeed launcher (or by `run_workers`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def engine_tp(sampling, backend: str | None = None) -> int:
    """GPUs per engine: upft.sampling.tensor_parallel_size with vLLM (`backend` overrides the setting's), 1
    with the hf loop."""
    from .generation import resolve_backend

    vllm = resolve_backend(backend or sampling.backend) == "vllm"
    return sampling.tensor_parallel_size if vllm else 1


def launcher_ranks(cfg) -> Distributed:
    return Distributed.from_env(ddp_timeout(cfg), engine_tp(UPFTConfig.from_cfg(cfg).sampling))


def sample_first(cfg) -> None:
    """Sample every `type: upft` dataset before Axolotl loads the data: under a launcher each rank its share
    (the process group stays: accelerate and DeepSpeed take it over), in one process its child workers."""
    if not upft_dataset_entries(cfg):
        return
    if launched():
        sample_datasets(cfg, launcher_ranks(cfg))
    else:
        start_workers(cfg)


def sample_datasets(cfg, dist: Distributed) -> list[Path]:
    """This rank's share of sampling every `type: upft` dataset of `cfg`, through Axolotl's own loader (so
    the questions are those `preprocess` sees); each dataset's sample folder."""
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.sft import _load_and_process_single_dataset

    from .dataset import SAMPLES_DIR
    from .inputs import check_inputs

    check_inputs(cfg)
    check_shared_cache(UPFTConfig.from_cfg(cfg).sample_cache_root(cfg), dist)
    if dist.world_size > 1:
        LOG.info(
            "UPFT: rank %d of %d samples as worker %s of %d",
            *(dist.rank, dist.world_size, dist.worker, dist.workers),
            main_process_only=False,
        )
    tokenizer = load_tokenizer(cfg)
    cfg[CFG_KEY] = dist
    try:
        loaded = [
            _load_and_process_single_dataset(ds, cfg, tokenizer, "train", cfg.seed)[0]
            for ds in upft_dataset_entries(cfg)
        ]
    finally:
        cfg.pop(CFG_KEY, None)  # Axolotl's own loading afterwards reads the cache as one process
    return [Path(json.loads(rows.info.description)[SAMPLES_DIR]) for rows in loaded]


def check_shared_cache(root: Path, dist: Distributed) -> None:
    """Ranks share their work through the cache folder, so it must be one folder on every node: rank 0
    leaves a file there and every rank looks for it, seconds into the run and not after ddp_timeout."""
    if dist.world_size == 1:
        return
    token = ""
    if dist.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            token = uuid.uuid4().hex
            (root / f".shared-{token}").write_text(f"{os.uname().nodename}\n")
        except OSError:  # a finished cache on a read-only disk: nothing to share
            token = ""
    token = dist.broadcast(token)
    if not token:
        return
    mark = root / f".shared-{token}"
    deadline = time.monotonic() + SHARED_WAIT
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = mark.exists()
    everywhere = dist.minimum({"seen": int(seen)})["seen"]  # every rank has looked once this returns
    if dist.rank == 0:
        mark.unlink()
    if not everywhere:
        who = f"this rank ({dist.rank}) does" if not seen else "a rank on another node does"
        raise ValueError(
            f"upft.cache_dir: {root} is not one folder shared by every node: {who} not see the file rank 0 "
            "wrote there, and the ranks share their samples through it. Set upft.cache_dir (by default "
            "inside dataset_prepared_path) to a folder on a filesystem every node mounts, or sample on one "
            "node first (`axolotl-upft sample`) and copy the cache folder to every node."
        )


def worker_devices(cfg) -> list[list[str] | None]:
    """The devices of each sampling worker of one process: upft.sampling.workers engines (null: as many as
    the visible GPUs hold), each on its own engine_tp GPUs; on CPU no devices (null: one worker)."""
    import torch

    sampling = UPFTConfig.from_cfg(cfg).sampling
    setting = sampling.workers
    if not torch.cuda.is_available():
        return [None] * (setting or 1)
    tp = engine_tp(sampling)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
    visible = visible.split(",")
    count = setting or max(1, len(visible) // tp)
    if count * tp > len(visible):
        raise ValueError(
            f"upft.sampling.workers: {count} engines of {tp} GPUs (tensor_parallel_size with vLLM) need "
            f"{count * tp} GPUs, but this process sees {len(visible)} ({','.join(visible)}). Lower "
            "upft.sampling.workers (null fits the GPUs) or tensor_parallel_size."
        )
    return [visible[i * tp : (i + 1) * tp] for i in range(count)]


@dataclass
class Worker:
    rank: int
    proc: subprocess.Popen
    log: Path
    copier: threading.Thread


def start_workers(cfg) -> int:
    """With more than one worker (`worker_devices`), sample in child processes and wait for them all."""
    groups = worker_devices(cfg)
    if len(groups) > 1:
        run_workers(cfg, groups)
    return len(groups)


def run_workers(cfg, groups: list[list[str] | None]) -> None:
    """One child process per group of devices, each a rank of a process group of their own on this machine;
    the first that fails stops the others and is raised with its exit code and log."""
    from .generation import TORCHRUN_VARIABLES

    folder = Path(tempfile.mkdtemp(prefix="upft-workers-"))
    (folder / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    LOG.info("UPFT: sampling in %d processes (upft.sampling.workers); their logs: %s", len(groups), folder)
    base = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}
    base |= {"WORLD_SIZE": str(len(groups)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    workers = [start_worker(folder, rank, devices, base, len(groups)) for rank, devices in enumerate(groups)]
    try:
        wait_all(workers)
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait()
            worker.copier.join()


def start_worker(folder: Path, rank: int, devices: list[str] | None, base: dict, count: int) -> Worker:
    """A child that is a node of its own (LOCAL_RANK 0 of 1), seeing only its own GPUs; on CPU it gets its
    share of the cores. Its output goes to its log; worker 0's shows in this console too."""
    env = base | {"RANK": str(rank), "GROUP_RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    else:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "axolotl_upft.workers", str(folder / "cfg.pkl")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = folder / f"worker-{rank}.log"
    copier = threading.Thread(target=copy_output, args=(proc.stdout, log, rank == 0), daemon=True)
    copier.start()
    return Worker(rank, proc, log, copier)


def copy_output(stream, log: Path, show: bool) -> None:
    with log.open("wb") as out:
        while chunk := stream.read1(65536):
            out.write(chunk)
            out.flush()
            if show:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()


def wait_all(workers: list[Worker]) -> None:
    while True:
        codes = [worker.proc.poll() for worker in workers]
        failed = next((w for w, code in zip(workers, codes) if code not in (None, 0)), None)
        if failed is not None:
            failed.copier.join(timeout=10)
            raise RuntimeError(worker_error(failed, len(workers)))
        if all(code == 0 for code in codes):
            return
        time.sleep(0.5)


def worker_error(worker: Worker, count: int) -> str:
    lines = worker.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
    return (
        f"UPFT: sampling worker {worker.rank} of {count} failed (exit code {worker.proc.returncode}); the "
        f"last lines of its log {worker.log}:\n" + "\n".join(lines) + "\nThe batches written before stay in "
        "the sample cache: run the command again to resume."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(cfg_path: str) -> None:
    """One sampling worker started by run_workers: its share of every dataset, then exit."""
    from axolotl.cli.config import prepare_plugins
    from axolotl.logging_config import configure_logging

    configure_logging()
    cfg = pickle.loads(Path(cfg_path).read_bytes())
    prepare_plugins(cfg)  # `type: upft` and the `upft:` block need the plugin registered in this process
    dist = launcher_ranks(cfg)
    try:
        sample_datasets(cfg, dist)
    finally:
        dist.close()


if __name__ == "__main__":
    main(sys.argv[1])
