"""Every GPU samples in the natural commands; CPU processes stand in for GPUs. `axolotl train` under a
launcher with no prior preprocess, `axolotl preprocess` with child workers, the tensor-parallel groups of a
node, and a cache folder the nodes do not share."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_axolotl_e2e import write_config
from test_distributed import env, free_port, torchrun

from axolotl_upft.cache import SampleCache
from axolotl_upft.cli import main
from axolotl_upft.distributed import engine_group, worker_layout

HARNESS = Path(__file__).parent / "harness"
slow = pytest.mark.slow


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_each_engine_of_a_node_of_8_gpus_takes_its_own_group_of_tp_gpus(tp):
    groups = [engine_group(8, rank, tp) for rank in range(8)]
    starters = [rank for rank, group in enumerate(groups) if group.starts]
    assert starters == list(range(0, 8, tp)), "one rank per group starts the engine: the group's first"
    for starter in starters:
        members = groups[starter].devices
        assert members == tuple(range(starter, starter + tp)), "the engine runs on its group's own GPUs"
        for rank in members:
            assert groups[rank].devices == members, "every rank of a group names the same GPUs"
            assert groups[rank].starts == (rank == starter), f"rank {rank} waits for rank {starter}'s engine"
    assert sorted(d for s in starters for d in groups[s].devices) == list(range(8)), "every GPU, once"
    assert {group.per_node for group in groups} == {8 // tp}


def test_local_rank_4_at_tp_2_gets_gpus_4_and_5_not_8_and_9():
    assert engine_group(8, 4, 2).devices == (4, 5)


def test_a_node_that_tp_does_not_divide_is_refused_with_the_setting_named():
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 4 does not divide the 6 processes"):
        engine_group(6, 0, 4)


def test_two_nodes_of_8_at_tp_2_have_8_workers_numbered_across_nodes():
    layouts = [
        worker_layout(
            {"WORLD_SIZE": "16", "RANK": str(r), "LOCAL_RANK": str(r % 8), "LOCAL_WORLD_SIZE": "8"}, 2
        )
        for r in range(16)
    ]
    assert [worker for worker, _ in layouts] == [w for i in range(8) for w in (i, None)]
    assert {count for _, count in layouts} == {8}
    child = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1"}
    assert worker_layout(child, 2) == (1, 2), "a preprocess worker is a node of its own with its tp GPUs"


def config(tmp: Path, model: Path, questions: list[dict], name: str, **settings) -> Path:
    """write_config's training config in its own folder: 24 questions, batches of 2 (several per rank)."""
    folder = tmp / name
    folder.mkdir()
    path = write_config(folder, model, questions, **settings.pop("cfg", {}))
    cfg = yaml.safe_load(path.read_text())
    cfg["upft"]["sampling"] |= {"batch_size": 2} | settings.pop("sampling", {})
    cfg["upft"] |= settings
    path.write_text(yaml.safe_dump(cfg))
    return path


def sample_run(config_path: Path) -> SampleCache:
    (meta,) = (config_path.parent / "prepared" / "upft_samples").glob("*/meta.json")
    cache = SampleCache(meta.parent.parent, json.loads(meta.read_text())["key"], {})
    assert cache.is_complete()
    return cache


def ranks_that_sampled(cache: SampleCache) -> set[int]:
    """The ranks whose part files in the cache hold generated tokens."""
    return {rank for rank, tokens in cache.tokens_by_rank().items() if tokens > 0}


def axolotl(command: str, config_path: Path, *extra: str, extra_env: dict | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", command, str(config_path), *extra],
        cwd=config_path.parent,
        env=env() | (extra_env or {}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    return log


@slow
def test_preprocess_with_two_workers_writes_the_cache_of_one(tmp_path, tiny_model, questions):
    one = config(tmp_path, tiny_model, questions, "one")
    done = CliRunner().invoke(main, ["sample", str(one)], catch_exceptions=False)  # in this process: faster
    assert done.exit_code == 0, done.output
    two = config(tmp_path, tiny_model, questions, "two", sampling={"workers": 2})
    log = axolotl("preprocess", two)
    assert re.search(r"sampling in 2 processes", log), log[-3000:]
    assert ranks_that_sampled(sample_run(two)) == {0, 1}
    assert sample_run(two).load() == sample_run(one).load(), "the same samples, however many workers"
    assert (two.parent / "prepared").is_dir() and "UPFT: 24 rows" in log, "then the rows, from the cache"


@slow
def test_axolotl_train_on_two_processes_samples_on_both(tmp_path, tiny_model, questions):
    cfg = {"sample_packing": False, "micro_batch_size": 1, "max_steps": 1}
    path = config(tmp_path, tiny_model, questions, "train", cfg=cfg)
    harness = os.pathsep.join([str(HARNESS), *filter(None, [os.environ.get("PYTHONPATH")])])
    launcher = ["--launcher", "torchrun", "--", "--nproc_per_node", "2", "--master_port", str(free_port())]
    log = axolotl("train", path, *launcher, extra_env={"PYTHONPATH": harness})
    assert ranks_that_sampled(sample_run(path)) == {0, 1}
    assert "UPFT sample summary" in log and (path.parent / "out").is_dir(), log[-3000:]


@slow
def test_a_cache_folder_the_nodes_do_not_share_fails_in_seconds_naming_upft_cache_dir(
    tmp_path, tiny_model, questions
):
    port, launches = str(free_port()), []
    for node in (0, 1):
        path = config(tmp_path, tiny_model, questions, f"node{node}", cfg={"ddp_timeout": 600})
        assert yaml.safe_load(path.read_text())["upft"].get("cache_dir") is None, "each node's own folder"
        nodes = ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr"]
        launches.append(torchrun(*nodes, "127.0.0.1", "--master_port", port) + [str(path)])
    started = time.monotonic()
    procs = [
        subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in launches
    ]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    seconds = time.monotonic() - started
    assert all(proc.returncode != 0 for proc in procs), logs[0][-3000:]
    for log in logs:
        assert "upft.cache_dir:" in log and "a filesystem every node mounts" in log, log[-3000:]
    assert seconds < 120, f"failed after {seconds:.0f} s, not after ddp_timeout (600 s)"
    assert not list(tmp_path.glob("node*/prepared/upft_samples/*/part-*.jsonl")), "nothing was sampled"


@slow
def test_a_failed_worker_is_reported_with_its_exit_code_and_its_log(tmp_path):
    from axolotl_upft.workers import run_workers

    broken = tmp_path / "questions.jsonl"
    broken.write_text("not json\n")
    cfg = {"datasets": [{"path": str(broken), "type": "upft"}], "upft": {"cache_dir": str(tmp_path / "s")}}
    with pytest.raises(RuntimeError, match=r"sampling worker \d of 2 failed \(exit code 1\)") as failed:
        run_workers(cfg, [None, None])
    assert f"{broken}: line 1 is not JSON" in str(failed.value), "the worker's own error, from its log"
