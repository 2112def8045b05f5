"""Test-only Axolotl plugin: the trained model's greedy tokens on one prompt, taken in memory at the end of
training (before Axolotl saves), so a test can compare them with the saved model reloaded from disk.

The prompt's token ids come in GREEDY_PROBE_IDS (comma-separated); the result is written by rank 0 to
`<output_dir>/greedy_probe.json` as {"prompt_ids", "tokens", "logits"} (logits of the first new token), with
the trainer's `log_history` at full precision (the console shows 4 digits) and what ran: the wrapped model's
class, the DeepSpeed ZeRO stage and the number of processes.
"""

import json
import os
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

PROBE_FILE = "greedy_probe.json"
NEW_TOKENS = 12


def greedy(model, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy continuation and the first step's logits; under ZeRO-3 every rank must call this."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.tensor([prompt_ids])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        model.train(was_training)
    return out.sequences[0, len(prompt_ids) :].tolist(), out.logits[0][0].float().tolist()


def what_ran(trainer) -> dict:
    import torch.distributed as dist

    engine = trainer.model_wrapped
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return {"engine": type(engine).__name__, "zero_stage": stage, "world_size": world_size}


class _Probe(TrainerCallback):
    def __init__(self, trainer, prompt_ids: list[int]):
        self.trainer, self.output_dir, self.prompt_ids = trainer, Path(trainer.args.output_dir), prompt_ids

    def on_train_end(self, args, state, control, model=None, **kwargs):
        tokens, logits = greedy(model, self.prompt_ids)
        if state.is_world_process_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            record = {
                "prompt_ids": self.prompt_ids,
                "tokens": tokens,
                "logits": logits,
                "log_history": state.log_history,
                **what_ran(self.trainer),
            }
            (self.output_dir / PROBE_FILE).write_text(json.dumps(record))


class GreedyProbePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        ids = [int(i) for i in os.environ["GREEDY_PROBE_IDS"].split(",")]
        return [_Probe(trainer, ids)]
