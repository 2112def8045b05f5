"""What the plugin makes of a whole config: no `upft:` block, keys one indent too far left, another plugin's
trainer, a `trainer_cls` of the old signature, and the model fingerprint on every load path."""

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from axolotl.core.training_args import AxolotlTrainingArguments
from axolotl.integrations.base import PluginManager
from axolotl.utils.dict import DictDefault
from harness.trainer_plugins import MarkedTrainer, OwnLossTrainer, OwnLossTrainerPlugin
from test_axolotl_e2e import run_axolotl, write_config

from axolotl_upft.plugin import UPFTPlugin
from axolotl_upft.trainer import SampleNormalizedMixin

TESTS = Path(__file__).parent
UPFT = "axolotl_upft.UPFTPlugin"


@pytest.fixture
def plugins(monkeypatch) -> collections.OrderedDict:
    """A plugin list of this test's own, in Axolotl's one PluginManager."""
    manager = PluginManager.get_instance()
    monkeypatch.setattr(manager, "plugins", collections.OrderedDict())
    return manager.plugins


def trainer_cls(plugins: dict, **cfg) -> type:
    """The trainer class Axolotl takes for a `upft:` config with these plugins, after UPFT registered."""
    cfg = DictDefault({"upft": {}, **cfg})
    plugins[UPFT].register(cfg)
    return PluginManager.get_instance().get_trainer_cls(cfg)


def test_a_trainer_cls_with_the_old_compute_loss_signature_is_refused_at_start_up(plugins):
    old = "harness.trainer_plugins.OldSignatureTrainer"
    with pytest.raises(ValueError, match=rf"trainer_cls: {old}: .*no num_items_in_batch parameter"):
        UPFTPlugin().register(DictDefault({"upft": {}, "trainer_cls": old}))  # load_cfg's first step
    UPFTPlugin().register(DictDefault({"upft": {}, "trainer_cls": "harness.trainer_plugins.MarkedTrainer"}))


def test_upft_is_asked_first_and_composes_its_loss_over_another_plugins_trainer(plugins):
    from harness.trainer_plugins import MarkedTrainerPlugin

    plugins["marked"] = MarkedTrainerPlugin()
    plugins[UPFT] = UPFTPlugin()
    cls = trainer_cls(plugins)
    assert next(iter(plugins)) == UPFT, "listed after the other, UPFT is moved first: Axolotl asks it first"
    assert cls.__mro__[1:3] == (SampleNormalizedMixin, MarkedTrainer)
    assert cls.upft_base_owner == "plugin marked"


def test_two_other_plugins_with_trainers_stop_with_an_error_naming_both(plugins):
    plugins["own_loss"] = OwnLossTrainerPlugin()
    plugins["own_loss_too"] = OwnLossTrainerPlugin()
    plugins[UPFT] = UPFTPlugin()
    with pytest.raises(ValueError, match="plugins own_loss, own_loss_too each supply a trainer"):
        trainer_cls(plugins)


def test_a_trainer_with_a_loss_of_its_own_stops_at_its_first_step_naming_both_plugins(plugins, tmp_path):
    from test_loss import packed, tiny_model

    plugins["own_loss"] = OwnLossTrainerPlugin()
    plugins[UPFT] = UPFTPlugin()
    cls = trainer_cls(plugins)
    assert issubclass(cls, OwnLossTrainer)
    args = AxolotlTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = cls(model=tiny_model(), args=args)
    ids = torch.randint(1, 64, (12,), generator=torch.Generator().manual_seed(0))
    batch = packed([(ids, ids.clone())])
    with pytest.raises(ValueError, match=r"plugin own_loss supplies the trainer OwnLossTrainer.*UPFTPlugin"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize(
    "key,place", [("prefix_length", "upft.prefix_length"), ("top_p", "upft.sampling.top_p")]
)
def test_a_upft_key_at_the_top_level_is_refused_with_where_it_belongs(plugins, key, place):
    plugins[UPFT] = UPFTPlugin()
    with pytest.raises(ValueError, match=rf"{key}: not Axolotl keys.*`{key}:` -> `{place}`"):
        plugins[UPFT].register(DictDefault({"upft": {}, key: 16}))
    plugins[UPFT].register(DictDefault({"upft": {}, "seed": 1, "batch_size": 8}))  # Axolotl's keys too


def axolotl_env(monkeypatch) -> None:
    """Subprocesses import the test plugins from tests/."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
def test_a_upft_key_one_indent_too_far_left_stops_preprocess_before_sampling(tmp_path, tiny_model, questions):
    config = write_config(tmp_path, tiny_model, questions, prefix_length=16)
    done = run_axolotl("preprocess", config, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "`prefix_length:` -> `upft.prefix_length`" in log, log[-3000:]
    assert not (tmp_path / "prepared" / "upft_samples").exists(), "nothing was sampled"


@pytest.mark.slow
def test_train_without_a_upft_block_trains_the_sample_loss_over_another_plugins_trainer(
    tmp_path, tiny_model, questions, monkeypatch
):
    """No `upft:` block means the defaults everywhere: the sample loss and its metrics, composed over the
    trainer of a plugin listed before UPFT (which Axolotl would otherwise take alone), and the model's
    fingerprint in the config Axolotl hashes."""
    axolotl_env(monkeypatch)
    plugins = ["harness.trainer_plugins.MarkedTrainerPlugin", UPFT]
    config = write_config(
        tmp_path, tiny_model, questions, plugins=plugins, sample_packing=False, dataset_num_proc=1
    )
    cfg = yaml.safe_load(config.read_text())
    del cfg["upft"]
    config.write_text(yaml.safe_dump(cfg))
    done = run_axolotl("train", config, "--launcher", "python")  # one process: no accelerate relaunch
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "upft.sampling.max_new_tokens=1024" in log, "sampled with the defaults (write_config's is 16)"
    assert "'upft/prefix_loss'" in log, "the sample loss's metrics: UPFT's mixin trained"
    assert "'marked_by_plugin'" in log, "over the other plugin's trainer"
    assert '"upft_model": {' in log, "the fingerprint is in the config Axolotl hashes"


@pytest.mark.slow
def test_scripted_loads_rebuild_rows_after_the_template_or_the_weights_change_in_place(
    tmp_path, tiny_model, questions
):
    """load_cfg + axolotl.common.datasets.load_datasets (the path of `axolotl evaluate` and notebooks) keys
    the prepared rows by the model's fingerprint, which covers chat_template.jinja."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert (model / "chat_template.jinja").exists(), "transformers saves the template beside the tokenizer"
    # 6 questions, no dataset workers, so each load is short; an unchanged model reuses its rows: test_cache
    config = write_config(tmp_path, model, questions[:6], sample_packing=False, dataset_num_proc=1)
    steps = ["load", "edit-template", "load", "touch-weights", "load"]
    done = subprocess.run(
        [sys.executable, str(TESTS / "harness" / "scripted_load.py"), str(config), *steps],
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    counts = [line for line in done.stdout.splitlines() if line.startswith("prepared: ")]
    assert counts == ["prepared: 1", "prepared: 2", "prepared: 3"], done.stdout[-2000:]
