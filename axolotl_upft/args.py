"""The `upft:` config block: one pydantic model, every field documented once."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .prompts import template_fields

ARGS_PATH = (
    f"{__name__}.UPFTArgs"  # what the plugin hands Axolotl; also how a registered plugin is recognised
)
DEFAULT_PREPARED_PATH = "last_run_prepared"  # Axolotl's default dataset_prepared_path
AXOLOTL_SEQUENCE_LEN = 512  # Axolotl's default sequence_len (its config always carries one)
UPFT_TYPES = ("upft", "axolotl_upft.dataset")  # the dataset `type:` spellings of this plugin
REFERENCE_INSTRUCTION = (
    "Please provide the initial step towards resolving the question. "
    "This step may serve as a foundation but might not encompass the entire solution."
)


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # set by generation.resolve_sampling: the user asked for backend auto (fallback to hf, cache reuse)
    _auto: bool = PrivateAttr(False)

    temperature: float = Field(0.6, ge=0.0, description="Sampling temperature; 0 means greedy.")
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Nucleus sampling; null takes the model's generation config."
    )
    top_k: int | None = Field(
        None, ge=0, description="Top-k sampling; null takes the model's generation config."
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        description="1.0 is off. generation_config.json's value is not applied, as in the reference's "
        "vLLM sampler.",
    )
    max_new_tokens: int = Field(
        1024, ge=1, description="Length limit of full (structure) traces; prefixes stop at prefix_length."
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="hf: full traces decoded at a time; null: on a GPU 256 or what fits in memory if less, "
        "16 on CPU (a batch that runs out of memory is halved). Also the most questions of a cache part "
        "file (4x this for the hf loop), which is otherwise sized from the number of questions and ranks "
        "(4 per rank and kind); vLLM, which schedules its own batches: null caps nothing.",
    )
    prefix_batch_size: int | None = Field(
        None,
        ge=1,
        description="Prefixes decoded at a time (they stop at k, so they can be more); null: batch_size "
        "if set, else for the hf loop on a GPU what fits in memory up to 2048, 16 on CPU, and for vLLM "
        "no cap. Caps a prefix part file as batch_size caps a full one.",
    )
    cache_implementation: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="hf backend KV cache; static: fixed shapes, which transformers compiles on a GPU "
        "(CUDA graphs), prompts padded to a multiple of 64.",
    )
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto",
        description="auto: what can sample the model as it is trained: vllm where it is installed and can "
        "load the model (no bitsandbytes; LoRA within vLLM's limits; on CPU its head sizes), else hf (the "
        "plugin's decode loop), with a log line saying why; also hf when vLLM's engine refuses to start. "
        "With auto, a finished sample cache of the other backend for the same settings is reused.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weights and activations while sampling (a quantized model's compute dtype); auto: the "
        "model's torch_dtype (config.json) on a GPU, float16 for bfloat16 where the GPU lacks it, "
        "float32 on CPU.",
    )
    quantization: Literal["auto", "none", "bnb-4bit", "bnb-8bit"] = Field(
        "auto",
        description="Weights of the sampled model. auto: as training loads them (load_in_4bit, load_in_8bit, "
        "gptq, model_quantization_config, or the checkpoint's own), so a QLoRA run samples from its 4-bit "
        "model; none: 16-bit; bnb-4bit / bnb-8bit: bitsandbytes, in Axolotl's settings for an adapter "
        "(qlora / lora) config. Off auto, samples come from another model than the one trained.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (vllm backend only).")
    workers: int | None = Field(
        None,
        ge=1,
        description="Sampling processes that one process (`axolotl preprocess`, a one-process `axolotl "
        "train` or `axolotl-upft sample`) starts, one engine each on its own GPUs (tensor_parallel_size of "
        "them with vLLM); null: the visible GPUs // tensor_parallel_size on a GPU machine, 1 on CPU. Under a "
        "launcher (torchrun, accelerate, DeepSpeed) the launcher's ranks sample instead.",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="vLLM: share of the device's memory the engine may take (on CPU: of RAM); null: "
        "vLLM's default on a GPU (0.9; the engine is shut down before training), 0.3 on CPU.",
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="vLLM: longest prompt + generation per request (generation stops there; part of the "
        "sample cache key); null: the run's longest prompt plus its longest generation, at most the model's "
        "context (max_position_embeddings).",
    )
    enforce_eager: bool | None = Field(
        None,
        description="vLLM: no CUDA graphs or torch.compile; null: eager on CPU (compiling costs more than it "
        "saves there), compiled on a GPU.",
    )


class UPFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix_length: int = Field(
        32,
        ge=1,
        description="k: generated tokens kept for prefix samples; below sampling.max_new_tokens when a run "
        "also has full traces.",
    )
    structure_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="p: share of questions that keep their full trace."
    )
    prefix_instruction: str | None = Field(
        REFERENCE_INSTRUCTION,
        description="Joined to the question of prefix samples after one space (as the reference); "
        "null or '' for none.",
    )
    prefix_eos: bool = Field(
        True,
        description="End prefix samples with the token that ends an assistant turn (the reference's EOS), "
        "inside the loss.",
    )
    question_field: str | None = Field(
        None,
        description="Column holding the question; null auto-detects question, problem, prompt, "
        "instruction, or the first user turn of messages.",
    )
    question_template: str | None = Field(
        None,
        description="The question built from the row's fields, each written {name}: e.g. "
        '"{Body} {Question}" ({{ and }} are literal braces). A row whose field is missing or null stops '
        "the run.",
    )
    system_prompt: str | None = Field(None, description="System turn of every prompt; null for none.")
    seed: int = Field(42, description="Seeds the structure split and the sampling.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    mode: Literal["upft", "sft", "rft"] = Field(
        "upft",
        description="upft: prefixes + a structure share; sft: one full self-trace per question "
        "(paper's SFT); "
        "rft: num_samples full traces per question, keep one with the gold answer (paper's RFT).",
    )
    label_filter: bool = Field(
        False,
        description="With mode upft: sample num_samples full traces, keep a correct one, "
        "train on its prefix.",
    )
    num_samples: int = Field(16, ge=1, description="Samples per question for rft and label_filter.")
    answer_field: str = Field(
        "answer", description="Gold answer column for rft / label_filter (GSM8K style: text after ####)."
    )
    eval_after_train: list[str] = Field(
        default_factory=list,
        description="Benchmarks (gsm8k, math500, aime24, amc23 or .jsonl paths) evaluated after "
        "`axolotl train`.",
    )
    loss_normalization: Literal["sample", "token"] = Field(
        "sample",
        description="sample: every row weighs the same (mean of row means, as the reference's "
        "micro-batch 1); "
        "token: Axolotl's mean over all trained tokens.",
    )
    cache_dir: str | None = Field(
        None, description="Where samples are kept; null puts them in <dataset_prepared_path>/upft_samples."
    )

    @classmethod
    def from_cfg(cls, cfg) -> "UPFTConfig":
        """The `upft:` block of an Axolotl cfg (or a raw YAML dict), validated; defaults when absent."""
        return cls.model_validate(dict(cfg.get("upft") or {}))

    def sample_cache_root(self, cfg) -> Path:
        """Where samples go: upft.cache_dir, else <dataset_prepared_path>/upft_samples."""
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(cfg.get("dataset_prepared_path") or DEFAULT_PREPARED_PATH) / "upft_samples"

    @property
    def needs_gold(self) -> bool:
        return self.mode == "rft" or self.label_filter

    @field_validator("question_template")
    @classmethod
    def _plain_template(cls, template: str | None) -> str | None:
        """Unbalanced braces and non-field names stop at config validation, before any data is read."""
        if template is not None:
            template_fields(template)
        return template

    @model_validator(mode="after")
    def _one_question_source(self):
        if self.label_filter and self.mode != "upft":
            raise ValueError(
                f"upft.label_filter applies to mode: upft, not mode: {self.mode} (rft already filters)"
            )
        if self.question_field is not None and self.question_template is not None:
            raise ValueError(
                "upft: set question_field or question_template, not both "
                "(the template can name the field: question_template: '{" + self.question_field + "}')"
            )
        return self

    @model_validator(mode="after")
    def _prefixes_shorter_than_full_traces(self):
        """Full traces must be able to run past the prefix: the trainer tells the two kinds apart by length,
        and label_filter cuts its prefixes from full traces."""
        both_kinds = self.structure_ratio < 1 and (self.structure_ratio > 0 or self.label_filter)
        k, limit = self.prefix_length, self.sampling.max_new_tokens
        if self.mode == "upft" and both_kinds and k >= limit:
            raise ValueError(
                f"upft.prefix_length ({k}) must be smaller than upft.sampling.max_new_tokens ({limit}): "
                "full traces would be no longer than prefixes, and the loss and the upft/* metrics would "
                "count them as prefixes. Lower upft.prefix_length or raise upft.sampling.max_new_tokens."
            )
        return self


class UPFTArgs(BaseModel):
    """Axolotl input args added by the plugin."""

    upft: UPFTConfig | None = Field(
        None,
        description="Unsupervised Prefix Fine-Tuning settings; absent or null with a `type: upft` dataset "
        "means every default.",
    )
    upft_model: dict | None = Field(
        None,
        description="Set by the plugin, not a setting: the base model's fingerprint (its weight, config, "
        "tokenizer and template files, or a hub id's revision), part of the prepared-data hash.",
    )


def upft_dataset_entries(cfg) -> list[dict]:
    """The `type: upft` entries of a config's `datasets:`."""
    return [d for d in cfg.get("datasets") or [] if d.get("type") in UPFT_TYPES]


def first_upft_dataset(cfg) -> dict | None:
    """The first `type: upft` entry of a config's `datasets:`, or None."""
    return next(iter(upft_dataset_entries(cfg)), None)


def uses_upft(cfg) -> bool:
    """A config with a `upft:` block or a `type: upft` dataset: UPFT samples, trains and hashes it."""
    return cfg.get("upft") is not None or first_upft_dataset(cfg) is not None


def misplaced_keys(cfg, known: set[str]) -> dict[str, str]:
    """Top-level keys of a raw config that are `upft:` settings and not `known` (Axolotl's own and other
    plugins'), which Axolotl would drop without a word, each with where it belongs."""
    places = {key: f"upft.sampling.{key}" for key in SamplingConfig.model_fields}
    places |= {key: f"upft.{key}" for key in UPFTConfig.model_fields}
    return {key: places[key] for key in cfg if key in places and key not in known}
