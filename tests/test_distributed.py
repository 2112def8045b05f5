"""`axolotl-upft sample` under torchrun (gloo, CPU): ranks share the work and write the same cache."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_axolotl_e2e import write_config

pytestmark = pytest.mark.slow


def env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_config(tmp: Path, model: Path, questions: list[dict], name: str, **upft) -> Path:
    (tmp / name).mkdir()
    config = write_config(tmp / name, model, questions)
    cfg = yaml.safe_load(config.read_text())
    cfg["upft"] |= {"cache_dir": str(tmp / name / "samples")} | upft
    config.write_text(yaml.safe_dump(cfg))
    return config


def run(args: list[str], timeout: int = 300) -> str:
    done = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def cache_files(config: Path) -> dict[str, str]:
    (run_dir,) = (config.parent / "samples").iterdir()
    return {p.name: p.read_text() for p in sorted(run_dir.glob("part-*.jsonl"))}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "axolotl_upft.cli", "sample"]


def test_two_ranks_and_two_nodes_write_exactly_the_cache_of_one_process(tmp_path, tiny_model, questions):
    small = {"sampling": {"max_new_tokens": 16, "batch_size": 2}}
    single = sample_config(tmp_path, tiny_model, questions, "single", **small)
    run([sys.executable, "-m", "axolotl_upft.cli", "sample", str(single)])
    expected = cache_files(single)
    assert len(expected) == 4, "24 questions in calls of 4 x 2: 18 prefix -> 3 parts, 6 full -> 1 part"

    ranks = sample_config(tmp_path, tiny_model, questions, "ranks", **small)
    out = run(torchrun("--nproc_per_node", "2", "--master_port", str(free_port())) + [str(ranks)])
    assert cache_files(ranks) == expected
    assert '"questions": 24' in out

    nodes = sample_config(tmp_path, tiny_model, questions, "nodes", **small)
    port = str(free_port())
    launch = [
        torchrun(
            "--nnodes",
            "2",
            "--node_rank",
            str(i),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        )
        + [str(nodes)]
        for i in (0, 1)
    ]
    procs = [
        subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in launch
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert cache_files(nodes) == expected


def test_a_killed_run_resumes_without_duplicates_or_losses(tmp_path, tiny_model, questions):
    options = {"sampling": {"max_new_tokens": 64, "batch_size": 1}, "prefix_length": 48}
    reference = sample_config(tmp_path, tiny_model, questions, "reference", **options)
    run([sys.executable, "-m", "axolotl_upft.cli", "sample", str(reference)])

    config = sample_config(tmp_path, tiny_model, questions, "killed", **options)
    proc = subprocess.Popen(
        [sys.executable, "-m", "axolotl_upft.cli", "sample", str(config)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples = config.parent / "samples"
    deadline = time.time() + 240
    while len(list(samples.glob("*/part-*.jsonl"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(samples.glob("*/part-*.jsonl")))
    assert 3 <= done_before < 24, "killed part-way"

    out = run([sys.executable, "-m", "axolotl_upft.cli", "sample", str(config)])
    assert '"tokens_generated_this_run": ' in out
    files = cache_files(config)
    assert files == cache_files(reference), "no duplicate, no partial row, the very samples of a clean run"
    summary = yaml.safe_load(next((samples).glob("*/summary.json")).read_text())
    assert summary["tokens_generated_this_run"] < summary["tokens_generated"], "the rerun sampled fewer"
