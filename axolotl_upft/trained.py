"""What samples: the model as Axolotl trains it (base weights, quantization, adapter), described once."""

import json
from dataclasses import dataclass
from pathlib import Path

BNB = {"bnb-4bit": "load_in_4bit", "bnb-8bit": "load_in_8bit"}  # upft.sampling.quantization: Axolotl's key
BNB_ADAPTER = {"bnb-4bit": "qlora", "bnb-8bit": "lora"}  # the adapter Axolotl quantizes each with
# One full copy of the model per process for sampling: the training run's sharding and parallel layout
# (FSDP's meta weights on ranks > 0, tensor or context parallel shards) does not apply.
SINGLE_PROCESS = {
    "fsdp": None,
    "fsdp_config": None,
    "deepspeed": None,
    "tensor_parallel_size": 1,
    "context_parallel_size": 1,
    "dp_shard_size": None,
    "qlora_sharded_model_loading": False,
}


def model_config(base_model: str) -> dict:
    """The model's config.json: a local folder's, or a hub id's (downloaded or cached)."""
    path = Path(base_model, "config.json")
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(base_model, "config.json"))
    return json.loads(path.read_text())


def checkpoint_quantization(base_model: str) -> str | None:
    """The method a pre-quantized checkpoint was saved in (gptq, awq, bitsandbytes, fp8, ...), or None."""
    method = (model_config(base_model).get("quantization_config") or {}).get("quant_method")
    return str(method) if method else None


def training_quantization(cfg) -> str | None:
    """How Axolotl loads the weights it trains: bitsandbytes, GPTQ, a transformers quantization config, or a
    pre-quantized checkpoint's own method; None for 16-bit."""
    if cfg.get("load_in_4bit"):
        return "bnb-4bit"
    if cfg.get("load_in_8bit"):
        return "bnb-8bit"
    if cfg.get("gptq"):
        return "gptq"
    if cfg.get("model_quantization_config"):
        return str(cfg["model_quantization_config"])
    return checkpoint_quantization(cfg["base_model"])


def sampling_cfg(cfg, quantization: str | None) -> dict:
    """A copy of `cfg` that Axolotl's loader turns into the sampled model: one process's full copy, with
    the quantization keys set for `quantization` (Axolotl derives its BitsAndBytesConfig from them)."""
    from axolotl.utils.dict import DictDefault

    keys = dict(SINGLE_PROCESS)
    if quantization is None or quantization in BNB:
        keys |= {"load_in_4bit": quantization == "bnb-4bit", "load_in_8bit": quantization == "bnb-8bit"}
    if quantization in BNB:
        keys["adapter"] = BNB_ADAPTER[quantization]
    elif quantization is None and cfg.get("adapter") == "qlora":
        keys["adapter"] = "lora"
    return DictDefault({**cfg, **keys})


@dataclass(frozen=True)
class TrainedModel:
    """The model a run trains, so sampling, eval and analysis draw from it (on-policy), not from a 16-bit
    copy of the base. `cfg` is the Axolotl config that loads it (hf backend: Axolotl's own model loader);
    None loads `base_model` (+ `adapter`) with transformers and PEFT, as `axolotl-upft eval --model` does."""

    base_model: str
    adapter: str | None = None  # LoRA folder on top of the base: lora_model_dir, or a trained output
    quantization: str | None = None  # None: 16-bit; "bnb-4bit", "bnb-8bit", or the checkpoint's own method
    cfg: dict | None = None

    @classmethod
    def from_cfg(cls, cfg, sampling) -> "TrainedModel":
        """The model an Axolotl cfg trains, in the weights `upft.sampling.quantization` asks for (auto: as
        trained). A cfg with `adapter:` but no `lora_model_dir` starts from a fresh LoRA, which leaves the
        base's outputs unchanged."""
        trained = training_quantization(cfg)
        choice = sampling.quantization
        wanted = trained if choice == "auto" else None if choice == "none" else choice
        if choice != "auto" and trained not in (None, *BNB):
            raise ValueError(
                f"upft.sampling.quantization: {choice} cannot re-quantize {cfg['base_model']}, "
                f"which training loads as {trained}. Set upft.sampling.quantization: auto."
            )
        if wanted in BNB and cfg.get("adapter") not in ("lora", "qlora"):
            raise ValueError(
                f"upft.sampling.quantization: {wanted} needs `adapter: lora` or `qlora` in the config: "
                "Axolotl quantizes only the base under an adapter, and a full fine-tune trains 16-bit "
                "weights. Set upft.sampling.quantization: auto (or none)."
            )
        return cls(cfg["base_model"], cfg.get("lora_model_dir"), wanted, sampling_cfg(cfg, wanted))

    def key(self) -> dict:
        """The weights' identity beyond the base's files, for cache keys: quantization and the adapter's
        files (a QLoRA cache is never reused for a 16-bit run, nor one adapter's for another)."""
        from .cache import model_fingerprint

        return {
            "quantization": self.quantization,
            "adapter": model_fingerprint(self.adapter) if self.adapter else None,
        }


def eval_quantization(cfg, sampling, model_path: str) -> str | None:
    """The quantization `eval --config` and `eval_after_train` load `model_path` in: the training config's
    (upft.sampling.quantization; auto: as trained) when it is the config's base model, under an adapter;
    a saved full model loads in 16 bits."""
    if model_path != cfg.get("base_model") or not cfg.get("adapter"):
        return None
    return TrainedModel.from_cfg(cfg, sampling).quantization
