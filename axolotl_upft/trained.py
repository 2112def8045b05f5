"""What samples: the model as Axolotl trains it (base weights, quantization, adapter), described once."""

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainedModel:
    """The model a run trains, so sampling, eval and analysis draw from it (on-policy), not from a 16-bit
    copy of the base. `cfg` is the Axolotl config that loads it (hf backend: Axolotl's own model loader);
    None loads `base_model` (+ `adapter`) with transformers and PEFT, as `axolotl-upft eval --model` does."""

    base_model: str
    adapter: str | None = None  # LoRA folder on top of the base: lora_model_dir, or a trained output
    quantization: str | None = None  # None: 16-bit; "bnb-4bit", "bnb-8bit", or the checkpoint's own method
    cfg: dict | None = None
