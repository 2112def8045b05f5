"""`axolotl-upft sample` under torchrun (gloo, CPU): ranks share the work and write the same cache."""

import contextlib
import json
import os
import re
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
    cfg["upft"]["sampling"] |= upft.pop("sampling", {})  # keeps write_config's backend: hf
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


def cached_records(config: Path) -> dict[int, tuple]:
    """(kind, prompt digest, sampled ids, stopped) of every cached record by question index: what a run
    drew, whichever part files it was written in."""
    (run_dir,) = (config.parent / "samples").iterdir()
    rows = [line for part in run_dir.glob("part-*.jsonl") for line in part.read_text().splitlines()[1:]]
    return {r["i"]: (r["kind"], r["q"], r["ids"], r["stop"]) for r in map(json.loads, rows)}


def test_two_ranks_and_two_nodes_share_the_questions_of_one_process(tmp_path, tiny_model, questions):
    small = {"sampling": {"max_new_tokens": 16, "batch_size": 2}}
    single = sample_config(tmp_path, tiny_model, questions, "single", **small)
    run([sys.executable, "-m", "axolotl_upft.cli", "sample", str(single)])
    assert len(cache_files(single)) == 8, "18 prefixes and 6 full traces, 4 parts of each (PARTS_PER_RANK)"

    ranks = sample_config(tmp_path, tiny_model, questions, "ranks", **small)
    out = run(torchrun("--nproc_per_node", "2", "--master_port", str(free_port())) + [str(ranks)])
    expected = cache_files(ranks)
    assert len(expected) == 8 + 6, "2 ranks: 8 prefix parts of at most 8 (calls of 4 x 2), 6 full of one"
    assert cached_records(ranks) == cached_records(single), "per-request seeds: the samples of one process"
    assert {json.loads(text.splitlines()[0])["rank"] for text in expected.values()} == {0, 1}
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
    assert cache_files(nodes) == expected, "two workers on two nodes: the parts and samples of two on one"


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
    assert 3 <= done_before < 9, "killed part-way (5 prefix parts of at most 4, calls of 4 x 1, 4 full)"

    out = run([sys.executable, "-m", "axolotl_upft.cli", "sample", str(config)])
    assert '"tokens_generated_this_run": ' in out
    files = cache_files(config)
    assert files == cache_files(reference), "no duplicate, no partial row, the very samples of a clean run"
    summary = yaml.safe_load(next((samples).glob("*/summary.json")).read_text())
    assert summary["tokens_generated_this_run"] < summary["tokens_generated"], "the rerun sampled fewer"


SLOW_RANK = Path(__file__).parent / "harness" / "slow_rank.py"


def slow_rank_run(
    tmp_path, tiny_model, questions, name: str, timeout: int, **late
) -> tuple[Path, list, dict]:
    """torchrun of two ranks with `ddp_timeout: timeout` where rank 1 is late with its first part file."""
    config = sample_config(
        tmp_path, tiny_model, questions, name, sampling={"max_new_tokens": 16, "batch_size": 2}
    )
    config.write_text(yaml.safe_dump(yaml.safe_load(config.read_text()) | {"ddp_timeout": timeout}))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_port", str(free_port()), str(SLOW_RANK), str(config)]
    late_env = {f"UPFT_TEST_{key.upper()}": str(value) for key, value in late.items()}
    return config, launch, env() | {"UPFT_TEST_SLOW_RANK": "1"} | late_env


def test_ranks_that_finish_first_wait_longer_than_ddp_timeout_for_a_slow_rank(
    tmp_path, tiny_model, questions
):
    config, launch, run_env = slow_rank_run(tmp_path, tiny_model, questions, "slow", 8, slow_seconds=20)
    done = subprocess.run(launch, env=run_env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert '"questions": 24' in done.stdout
    parts = config.parent.glob("samples/*/part-*.jsonl")
    written = sorted(p.stat().st_mtime for p in parts)
    assert len(written) == 8 + 6 and written[-1] - written[0] > 8, "rank 0 waited past ddp_timeout for rank 1"


def test_a_frozen_rank_fails_the_others_after_ddp_timeout_with_an_error_naming_it(
    tmp_path, tiny_model, questions
):
    pid_file = tmp_path / "frozen.pid"
    _, launch, run_env = slow_rank_run(tmp_path, tiny_model, questions, "frozen", 5, freeze_pid_file=pid_file)
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        proc = subprocess.Popen(launch, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # torchrun saw rank 0 fail when it starts closing the others (rank 1, still frozen)
        deadline = time.time() + 120
        while "closing signal" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert "rank 1 still owes 7 batches" in log.read_text(), log.read_text()[-4000:]  # 4 prefix, 3 full
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):  # else torchrun waits 30 s before it kills it
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun ends its workers on SIGTERM
            proc.wait(timeout=60)
    # Only then is rank 1 killed (exit code -9): the failure torchrun reports is rank 0's own exit code 1.
    assert re.search(r"failed \(exitcode: 1\) local_rank: 0 ", log.read_text()), log.read_text()[-4000:]
