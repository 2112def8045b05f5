"""Test-only: this process's memory (RSS) before and after the hf sampler loads a model, samples and closes,
for a 16-bit model (transformers) and a QLoRA config's 4-bit model (Axolotl's loader).

    python sampler_memory.py WARMUP_MODEL MODEL   # prints JSON: {"before", "after": {case: bytes}, ...}

A first round on WARMUP_MODEL loads what is loaded once per process (modules, kernels, thread pools), so
what stays after that is what the sampler left behind.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiny

from axolotl_upft.args import SamplingConfig
from axolotl_upft.generation import HFSampler
from axolotl_upft.trained import TrainedModel

QLORA = {"load_in_4bit": True, "adapter": "qlora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
QLORA |= {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sample_and_close(model: TrainedModel) -> int:
    """Load, sample 4 prompts x 8 greedy tokens, close; the loaded weights' bytes."""
    sampler = HFSampler.load(model, SamplingConfig())
    weights = sampler.model.get_memory_footprint()
    options = {"stop_ids": frozenset(), "pad_id": 0, "temperature": 0, "top_p": None, "top_k": None}
    sampler.generate([[5, 6, 7, 8]] * 4, seeds=[0, 1, 2, 3], max_new_tokens=8, **options)
    sampler.close()
    return weights


def cases(model: Path) -> dict[str, TrainedModel]:
    return {
        "16-bit": TrainedModel(str(model)),
        "4-bit": TrainedModel.from_cfg(tiny.axolotl_cfg(model, **QLORA), SamplingConfig()),
    }


def main(warmup: Path, model: Path) -> dict:
    for trained in cases(warmup).values():
        sample_and_close(trained)
    report = {"before": rss(), "after": {}, "weights": {}}
    for name, trained in cases(model).items():
        report["weights"][name] = sample_and_close(trained)
        report["after"][name] = rss()
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
