"""DeepSpeed ZeRO-2 / ZeRO-3 with the plugin, run for real on CPU through `axolotl train --launcher torchrun`:
2 processes on one node, 2 simulated nodes on localhost, and QLoRA under ZeRO-2. The ZeRO-2 and ZeRO-3 runs
are checked per step against a 1-process run without DeepSpeed on the same rows and the same global batch;
every run's saved output is reloaded and must give the greedy tokens the in-memory model gave at the end of
training.

The CUDA-only code paths in Axolotl and accelerate are answered by tests/harness/sitecustomize.py (on the
subprocesses' PYTHONPATH only); tests/harness/greedy_probe.py records the in-memory greedy tokens."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import yaml
from test_axolotl_e2e import prepared_rows
from test_training_configs import ROOT, example, logged_dicts, tiny_config

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed", reason="DeepSpeed runs need `pip install deepspeed` (DS_BUILD_OPS=0)")

HARNESS = Path(__file__).parent / "harness"
sys.path.insert(0, str(HARNESS))
from greedy_probe import PROBE_FILE, greedy

FULL_ZERO3 = "qwen2.5-math-7b-zero3-k32.yml"  # full fine-tune, example_configs/deepspeed/zero3.json
LORA_ZERO2 = "qwen2.5-math-7b-zero2-lora-k32.yml"  # LoRA, example_configs/deepspeed/zero2.json
QLORA = "llama3.1-8b-qlora-k8.yml"
STEPS = 3
# Same rows per optimizer step everywhere: a sequential sampler, 4 rows per step. Two ranks at
# micro-batch 1 x accumulation 2 see rows (0, 2) and (1, 3); one process at micro-batch 2 x 2 sees (0, 1),
# (2, 3).
SAME_ROWS = {
    "sample_packing": False,
    "curriculum_sampling": True,
    "gradient_accumulation_steps": 2,
    "max_steps": STEPS,
    "learning_rate": 1e-3,  # 3 steps move the logits far beyond the reload check's tolerance
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "logging_steps": 1,
    "save_strategy": "no",
    "seed": 42,
}
TWO_RANKS = {"micro_batch_size": 1}
ONE_PROCESS = {"micro_batch_size": 2, "deepspeed": None}
# Losses and pre-clip gradient norms of a 2-rank DeepSpeed run vs the 1-process run: only the order of
# float32 sums differs (a gather over ranks, ZeRO's reduce-scatter), so they agree far below this.
REL_TOL = 1e-4
UPFT = {
    "prefix_length": 6,
    "structure_ratio": 0.25,
    "sampling": {"max_new_tokens": 16, "batch_size": 8, "backend": "hf"},
    "loss_normalization": "sample",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def harness_env(probe_ids: list[int]) -> dict:
    path = os.pathsep.join([str(HARNESS), *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        PYTHONPATH=path,
        GREEDY_PROBE_IDS=",".join(map(str, probe_ids)),
    )


def launch(config: Path, probe_ids: list[int], *torchrun_args: str, name: str = "train") -> subprocess.Popen:
    """`axolotl train cfg.yml [--launcher torchrun -- ARGS]`, its output in `<config>.<name>.log`."""
    launcher = ["--launcher", "torchrun", "--", *torchrun_args] if torchrun_args else []
    with open(config.with_suffix(f".{name}.log"), "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "axolotl.cli.main", "train", str(config), *launcher],
            cwd=config.parent,
            env=harness_env(probe_ids),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout stops the launcher's workers too
        )
    proc.log_path = Path(log.name)
    return proc


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = proc.log_path.read_text(errors="replace")
    assert proc.returncode == 0, log[-6000:]
    return log


def train(config: Path, probe_ids: list[int], *torchrun_args: str) -> str:
    return finish(launch(config, probe_ids, *torchrun_args))


def write(tmp: Path, name: str, model: Path, questions: list[dict], example_name: str, **overrides) -> Path:
    """An example config on the tiny model (tiny_config), the UPFT block above, the greedy probe added."""
    source = example(example_name)
    kept = {
        "plugins": source["plugins"] + ["greedy_probe.GreedyProbePlugin"],
        "upft": UPFT,
        "adapter": source.get("adapter"),  # None: a full fine-tune (write_config's default is LoRA)
    }
    settings = SAME_ROWS | {"output_dir": str(tmp / name)} | overrides
    tiny_config(tmp, model, questions, source | kept, **settings)
    cfg = {k: v for k, v in yaml.safe_load((tmp / "cfg.yml").read_text()).items() if v is not None}
    config = tmp / f"{name}.yml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def steps(out: Path, log: str) -> list[dict]:
    """Per-step logs at full precision (from the probe), after checking the console printed as many."""
    assert len([d for d in logged_dicts(log) if "loss" in d]) == STEPS
    logged = [d for d in json.loads((out / PROBE_FILE).read_text())["log_history"] if "loss" in d]
    assert len(logged) == STEPS, logged
    return logged


def assert_same_steps(run: list[dict], reference: list[dict]) -> None:
    """Loss, pre-clip gradient norm (the gradient's scale) and the prefix-row loss agree per step."""
    for key in ("loss", "grad_norm", "upft/prefix_loss", "upft/full_loss"):
        got, want = [float(d[key]) for d in run], [float(d[key]) for d in reference]
        assert got == pytest.approx(want, rel=REL_TOL), (key, got, want)


def probe_ids(tokenizer, questions: list[dict]) -> list[int]:
    messages = [{"role": "user", "content": questions[30]["question"]}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def assert_reload_gives_the_in_memory_tokens(out: Path, base_model: Path, atol: float = 1e-5) -> None:
    """The saved output, loaded back with transformers / peft, gives the greedy tokens (and first-step logits
    within `atol`) the in-memory model gave at the end of training; the untrained model's logits differ."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = json.loads((out / PROBE_FILE).read_text())
    quantized = json.loads((out / "config.json").read_text()).get("quantization_config")
    if quantized:
        from transformers import BitsAndBytesConfig

        quantized = {"quantization_config": BitsAndBytesConfig.from_dict(quantized)}
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32, **(quantized or {}))
    _, base_logits = greedy(base, probe["prompt_ids"])
    if (out / "adapter_model.safetensors").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens, logits = greedy(model, probe["prompt_ids"])
    assert tokens == probe["tokens"]
    assert torch.allclose(torch.tensor(logits), torch.tensor(probe["logits"]), atol=atol)
    assert not torch.allclose(torch.tensor(base_logits), torch.tensor(probe["logits"]), atol=atol), (
        "training moved the model, so the check above could tell the saved weights from the base model's"
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model, questions, tiny_tokenizer) -> dict:
    """One folder for the one-node runs: their configs share the prepared rows (sampled by the first run)."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    ids = probe_ids(tiny_tokenizer, questions)
    return {"tmp": tmp, "model": tiny_model, "questions": questions, "ids": ids}


def run_in(shared: dict, name: str, example_name: str, *torchrun_args: str, **overrides) -> tuple[Path, str]:
    config = write(
        shared["tmp"],
        name,
        shared["model"],
        shared["questions"],
        example_name,
        dataset_prepared_path=str(shared["tmp"] / "prepared"),
        **overrides,
    )
    return shared["tmp"] / name, train(config, shared["ids"], *torchrun_args)


@pytest.fixture(scope="module")
def full_reference(shared) -> list[dict]:
    """The ZeRO-3 example's full fine-tune in one process without DeepSpeed: 2 rows x 2 accumulation steps."""
    return steps(*run_in(shared, "full-1proc", FULL_ZERO3, **ONE_PROCESS))


@pytest.fixture(scope="module")
def lora_reference(shared) -> list[dict]:
    return steps(*run_in(shared, "lora-1proc", LORA_ZERO2, **ONE_PROCESS))


def two_processes() -> list[str]:
    return ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def assert_deepspeed_ran(out: Path, stage: int) -> None:
    probe = json.loads((out / PROBE_FILE).read_text())
    assert (probe["engine"], probe["zero_stage"], probe["world_size"]) == ("DeepSpeedEngine", stage, 2)


def test_zero3_on_two_processes_matches_one_process_and_saves_weights_that_reload(shared, full_reference):
    out, log = run_in(shared, "zero3-2proc", FULL_ZERO3, *two_processes(), **TWO_RANKS)
    assert_deepspeed_ran(out, stage=3)
    assert_same_steps(steps(out, log), full_reference)
    assert (out / "model.safetensors").exists(), "stage3_gather_16bit_weights_on_model_save wrote one file"
    assert_reload_gives_the_in_memory_tokens(out, shared["model"])


def test_zero2_lora_on_two_processes_matches_one_process_and_saves_an_adapter_that_reloads(
    shared, lora_reference
):
    out, log = run_in(shared, "zero2-2proc", LORA_ZERO2, *two_processes(), **TWO_RANKS)
    assert_deepspeed_ran(out, stage=2)
    assert_same_steps(steps(out, log), lora_reference)
    assert_reload_gives_the_in_memory_tokens(out, shared["model"])


def test_zero3_on_two_simulated_nodes_samples_once_and_matches_one_process(tmp_path, shared, full_reference):
    """Two launches on localhost, one process each, rendezvous on 127.0.0.1; the prepared rows and the sample
    cache in one folder both "nodes" see (a shared filesystem). Nothing was sampled before: `train`
    samples."""
    config = write(tmp_path, "zero3-2node", shared["model"], shared["questions"], FULL_ZERO3, **TWO_RANKS)
    port = str(free_port())
    nodes = [
        launch(
            config,
            shared["ids"],
            "--nnodes",
            "2",
            "--node_rank",
            str(rank),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            name=f"node{rank}",
        )
        for rank in (0, 1)
    ]
    try:
        logs = [finish(node) for node in nodes]
    finally:
        for node in nodes:  # one node failed: do not leave the other waiting for it
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    sampled = [len(re.findall(r"UPFT sampling:\s+0%", log)) for log in logs]
    assert sum(sampled) == 1, f"sampling runs per node: {sampled}; Axolotl's data lock lets one sample"
    summary = json.loads(next((tmp_path / "prepared" / "upft_samples").glob("*/summary.json")).read_text())
    assert summary["tokens_generated_this_run"] == summary["tokens_generated"], "train sampled all of it"
    _, rows = prepared_rows(tmp_path)
    _, one_node_rows = prepared_rows(shared["tmp"])
    assert rows == one_node_rows, "the same seeded samples as the one-node runs, so the same rows per step"
    out = tmp_path / "zero3-2node"
    assert_deepspeed_ran(out, stage=3)
    assert_same_steps(steps(out, logs[0]), full_reference)
    assert_reload_gives_the_in_memory_tokens(out, shared["model"])


def test_qlora_under_zero2_on_two_processes_trains_and_saves_an_adapter_that_reloads(
    tmp_path, tiny_corpus, questions, tiny_tokenizer
):
    """The QLoRA example (4-bit nf4 base through bitsandbytes' CPU backend) with zero2.json added, on the tiny
    model at hidden size 64: bitsandbytes 0.50's CPU inference path (`_convert_weight_packed_for_cpu`, taken
    in eval mode without gradients on CPUs with AVX512-BF16) fails on a 4-bit weight with fewer input
    features (32) than its 64-value quantization block: "shape '[32, 0]' is invalid". Training is not
    affected; greedy decoding of the trained model is."""
    model = tiny.build_model(tmp_path / "tiny-llama-64", tiny_corpus, hidden=64)
    source = example(QLORA)
    assert source["adapter"] == "qlora" and source["load_in_4bit"] is True
    config = write(
        tmp_path,
        "qlora-zero2",
        model,
        questions,
        QLORA,
        deepspeed=str(ROOT / "example_configs/deepspeed/zero2.json"),
        **TWO_RANKS,
    )
    log = train(config, probe_ids(tiny_tokenizer, questions), *two_processes())
    out = tmp_path / "qlora-zero2"
    assert "prepare_model_for_kbit_training" in log, "Axolotl took its k-bit (bitsandbytes) loading path"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_4bit"] is True
    assert_deepspeed_ran(out, stage=2)
    assert [d["upft/prefix_loss"] > 0 for d in steps(out, log)] == [True] * STEPS
    # bitsandbytes' packed CPU kernel computes in bfloat16: reloaded vs in-memory logits differed by 1.3e-3
    # (of logits up to 1.1), the trained vs the untrained model's by 0.2.
    assert_reload_gives_the_in_memory_tokens(out, model, atol=1e-2)
