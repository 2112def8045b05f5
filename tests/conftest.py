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

from axolotl_upft.args import REFERENCE_INSTRUCTION


@pytest.fixture(scope="session")
def questions() -> list[dict]:
    return tiny.gsm8k_questions(40)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, questions) -> Path:
    corpus = [q["question"] + " " + q["answer"] for q in tiny.gsm8k_questions(200)] + [
        REFERENCE_INSTRUCTION,
        "You are a careful math tutor .",
        "The answer is 18 .",
    ]
    return tiny.build_model(tmp_path_factory.mktemp("tiny-llama"), corpus)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)
