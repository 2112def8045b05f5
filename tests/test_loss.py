"""Sample normalisation: packed, padded and accumulated batches give the micro-batch-1 loss and gradient."""

import math

import pytest
import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.core.training_args import AxolotlTrainingArguments
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from axolotl_upft.loss import count_trained_rows, per_row_mean_nll, row_ids
from axolotl_upft.trainer import sample_normalized_trainer

VOCAB = 64
PREFIX_LENGTH = 8
# (prompt tokens, trained tokens): prefixes of <= k + 1 tokens next to long full traces.
ROWS = [(5, 3), (9, 40), (3, 2), (6, 9), (4, 70), (7, 4)]
PREFIX_ROWS, FULL_ROWS = [0, 2, 3, 5], [1, 4]
# Uneven on purpose: a per-micro-batch mean divided by the accumulation steps would weigh rows unequally.
MICRO_BATCHES = [[0, 1], [2, 3, 4, 5]]


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_cache=False,  # without a cache, HF reads packed rows from position_ids
    )
    return LlamaForCausalLM(config)


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def rows() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for prompt, trained in ROWS:
        ids = torch.randint(1, VOCAB, (prompt + trained,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append((ids, labels))
    return out


@pytest.fixture(scope="module")
def reference(rows):
    """Micro-batch 1, one forward per row: sample = mean of row means, token = mean over trained tokens."""
    out = {}
    for mode in ("sample", "token"):
        model = tiny_model()
        row_losses = [model(input_ids=ids[None], labels=labels[None]).loss for ids, labels in rows]
        tokens = [int((labels[1:] != -100).sum()) for _, labels in rows]
        if mode == "sample":
            loss = torch.stack(row_losses).mean()
        else:
            loss = sum(row_loss * n for row_loss, n in zip(row_losses, tokens)) / sum(tokens)
        loss.backward()
        out[mode] = {
            "loss": loss.detach(),
            "grads": grads(model),
            "row_losses": [x.item() for x in row_losses],
        }
    return out


def packed(rows) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.cat([ids for ids, _ in rows])[None],
        "labels": torch.cat([labels for _, labels in rows])[None],
        "position_ids": torch.cat([torch.arange(len(ids)) for ids, _ in rows])[None],
    }


def padded(rows) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), length, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
        "labels": torch.full((len(rows), length), -100),
    }
    for i, (ids, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = ids
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, : len(ids)] = labels
    return batch


def micro_batches(rows, layout) -> list[dict[str, torch.Tensor]]:
    return [layout([rows[i] for i in indices]) for indices in MICRO_BATCHES]


def make_trainer(base, tmp_path, **kwargs):
    args_cls = AxolotlTrainingArguments if issubclass(base, AxolotlTrainer) else TrainingArguments
    args = args_cls(
        output_dir=str(tmp_path),
        use_cpu=True,
        gradient_accumulation_steps=len(MICRO_BATCHES),
        average_tokens_across_devices=base is not AxolotlTrainer,  # Axolotl turns it off
        report_to=[],
    )
    cls = sample_normalized_trainer(base, prefix_length=PREFIX_LENGTH)
    return cls(model=tiny_model(), args=args, **kwargs)


def accumulate(trainer, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step's worth of training_step calls, as Trainer's inner loop makes them."""
    samples, num_items = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    trainer.current_gradient_accumulation_steps = len(samples)
    loss = sum(trainer.training_step(trainer.model, batch, num_items) for batch in samples)
    return loss, num_items


def assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_rows_split_at_batch_rows_and_where_packed_positions_restart():
    labels = torch.zeros(2, 4, dtype=torch.long)
    assert row_ids(None, labels).tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    # Axolotl pads position_ids with a fresh range, so padding becomes a row of its own (with no targets).
    position_ids = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])
    assert row_ids(position_ids, labels).tolist() == [[0, 0, 0, 0], [1, 1, 2, 2]]


def test_each_row_gets_its_own_mean_nll_and_token_count():
    labels = torch.tensor([[-100, 1, 2, -100, 3, 0, 1]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    logits = torch.zeros(1, 7, 4)
    for t in (4, 5, 6):  # the second row predicts its targets with p = 1/2, the first with p = 1/4
        logits[0, t - 1, labels[0, t]] = math.log(3)
    stats = per_row_mean_nll(logits, labels, position_ids)
    assert stats.rows == 2
    assert stats.row_tokens.tolist() == [2, 3]
    torch.testing.assert_close(stats.row_nll, torch.tensor([2 * math.log(4), 3 * math.log(2)]))
    torch.testing.assert_close(stats.row_mean_sum, torch.tensor(math.log(4) + math.log(2)))


def test_a_packed_row_first_token_is_never_predicted_from_the_row_before():
    labels = torch.tensor([[-100, 3, 4, 5, -100]])
    logits = torch.zeros(1, 5, 8)
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    assert per_row_mean_nll(logits, labels, position_ids).row_tokens.tolist() == [2]
    assert count_trained_rows(labels, position_ids) == 1
    assert per_row_mean_nll(logits, labels).row_tokens.tolist() == [3]


def test_a_micro_batch_without_trained_tokens_adds_zero_loss_and_still_backpropagates():
    logits = torch.randn(1, 4, 8, requires_grad=True)
    stats = per_row_mean_nll(logits, torch.full((1, 4), -100))
    assert stats.rows == 0
    stats.row_mean_sum.backward()
    assert not logits.grad.any()


@pytest.mark.parametrize("layout", [packed, padded])
@pytest.mark.parametrize("base", [Trainer, AxolotlTrainer])
def test_sample_mode_with_accumulation_gives_the_micro_batch_one_loss_and_gradient(
    rows, reference, layout, base, tmp_path
):
    trainer = make_trainer(base, tmp_path)
    loss, num_items = accumulate(trainer, micro_batches(rows, layout))
    assert num_items == len(ROWS)
    torch.testing.assert_close(loss, reference["sample"]["loss"], atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(trainer.model), reference["sample"]["grads"])
    # The two normalisations must really differ here, or this test would prove nothing.
    assert not torch.allclose(reference["sample"]["loss"], reference["token"]["loss"], atol=1e-3)


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_the_trainer_axolotl_builds_with_the_plugin_gives_each_modes_loss_and_gradient(
    rows, reference, mode, tmp_path
):
    from axolotl.core.builders.causal import HFCausalTrainerBuilder
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.dict import DictDefault

    PluginManager.get_instance().register("axolotl_upft.UPFTPlugin")
    cfg = DictDefault(
        {
            "base_model": "tiny",
            "model_config_type": "llama",
            "upft": {"prefix_length": PREFIX_LENGTH, "loss_normalization": mode},
        }
    )
    cls = HFCausalTrainerBuilder(cfg, tiny_model(), None)._get_trainer_cls()  # Axolotl's own choice
    assert issubclass(cls, AxolotlTrainer)
    args = AxolotlTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_accumulation_steps=len(MICRO_BATCHES)
    )
    trainer = cls(model=tiny_model(), args=args)
    loss, _ = accumulate(trainer, micro_batches(rows, packed))
    torch.testing.assert_close(loss, reference[mode]["loss"], atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(trainer.model), reference[mode]["grads"])


def test_the_logs_carry_prefix_and_full_row_losses_and_tokens_per_step(rows, reference, tmp_path):
    trainer = make_trainer(AxolotlTrainer, tmp_path)
    for _ in range(2):
        accumulate(trainer, micro_batches(rows, packed))
    trainer.state.global_step = 2
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    row_losses = reference["sample"]["row_losses"]
    assert logged["upft/prefix_tokens"] == sum(ROWS[i][1] for i in PREFIX_ROWS) == 18
    assert logged["upft/full_tokens"] == sum(ROWS[i][1] for i in FULL_ROWS) == 110
    assert logged["upft/prefix_loss"] == pytest.approx(sum(row_losses[i] for i in PREFIX_ROWS) / 4, abs=1e-5)
    assert logged["upft/full_loss"] == pytest.approx(sum(row_losses[i] for i in FULL_ROWS) / 2, abs=1e-5)
    trainer.log({"loss": 1.0})
    assert "upft/prefix_loss" not in trainer.state.log_history[-1]


def test_sample_mode_refuses_to_be_combined_with_another_custom_loss(tmp_path):
    with pytest.raises(ValueError, match="loss_normalization: sample"):
        make_trainer(Trainer, tmp_path, compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0)


def test_the_plugin_composes_the_mixin_for_sample_and_leaves_token_to_axolotl():
    from axolotl.utils.dict import DictDefault

    from axolotl_upft.plugin import UPFTPlugin
    from axolotl_upft.trainer import SampleNormalizedMixin

    plugin = UPFTPlugin()
    cls = plugin.get_trainer_cls(DictDefault({"upft": {"prefix_length": PREFIX_LENGTH}}))
    assert cls.__name__ == "UPFTAxolotlTrainer" and cls.__mro__[1:3] == (
        SampleNormalizedMixin,
        AxolotlTrainer,
    )
    assert cls.upft_prefix_length == PREFIX_LENGTH
    assert plugin.get_trainer_cls(DictDefault({"upft": {"loss_normalization": "token"}})) is None
