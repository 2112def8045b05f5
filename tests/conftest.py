import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import tiny

from axolotl_upft import generation
from axolotl_upft.args import REFERENCE_INSTRUCTION


@pytest.fixture(autouse=True)
def hf_loop_unless_marked_vllm(request, monkeypatch):
    """`backend: auto` is vLLM wherever it is installed, as in `make test`. The tiny models of most tests
    exercise the hf loop (and its head size is one vLLM's CPU kernels refuse), so vLLM is hidden from
    `auto` in this process except in tests marked `vllm`; configs for subprocesses say `backend: hf`."""
    if request.node.get_closest_marker("vllm") is None:
        monkeypatch.setattr(generation, "is_vllm_available", lambda: False)


@pytest.fixture(autouse=True)
def plugin_logs_reach_caplog(monkeypatch):
    """Axolotl's logging config (applied once any test imports `axolotl.cli`) keeps `axolotl.*`, the plugin's
    loggers included, at its own console handlers; caplog listens at the root."""
    monkeypatch.setattr(logging.getLogger("axolotl"), "propagate", True)


@pytest.fixture(scope="session")
def questions() -> list[dict]:
    return tiny.gsm8k_questions(40)


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    return [q["question"] + " " + q["answer"] for q in tiny.gsm8k_questions(200)] + [
        REFERENCE_INSTRUCTION,
        "You are a careful math tutor .",
        "The answer is 18 .",
    ]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_corpus) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("tiny-llama"), tiny_corpus)


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory, tiny_corpus) -> Path:
    """A tiny model vLLM's CPU attention accepts (head size 64), with top-k 20 and top-p 0.95 in its
    generation_config.json."""
    return tiny.build_model(tmp_path_factory.mktemp("tiny-vllm"), tiny_corpus, hidden=128, heads=2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)
