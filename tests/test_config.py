from pathlib import Path

import pytest

from conftest import ROOT
from qwenvl_tune.commands import overrides as _overrides, parser as _parser
from qwenvl_tune.config import Config, ConfigError, build_config, config_from_dict, iter_fields



def test_defaults_are_the_guides_values_with_defects_fixed():
    c = build_config()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (8, 16, 0.05, ["q_proj", "v_proj"])
    assert (c.train.lr, c.train.warmup_steps, c.train.gradient_clip_val) == (2e-4, 50, 1.0)
    # the guide's 8 samples per optimizer step, as 2 length-grouped samples x 4 micro-batches (faster than 1 x 8)
    assert (c.train.batch_size, c.train.accumulate_grad_batches) == (2, 4)
    assert (c.data.min_pixels, c.data.max_pixels) == (256 * 28 * 28, 1280 * 28 * 28)
    assert c.model.name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert c.data.system_message is None
    assert c.train.limit_val_batches is None


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_parses(preset):
    c = build_config(preset)
    assert preset.read_text().startswith("#"), "each preset starts with a comment showing how to run it"
    assert "Run it with" in preset.read_text().splitlines()[1] or "Run it with" in preset.read_text()
    assert isinstance(c, Config)
    # a preset is a delta over the defaults: every key it sets differs from the default
    from qwenvl_tune.config import Config as Defaults, flatten, load_yaml

    defaults = Defaults().flat()
    same = [k for k in load_yaml(preset) if defaults.get(k) == c.flat()[k] and k != "model.name_or_path"]  # it names its model
    assert not same, f"{preset.name} repeats defaults: {same}"


def test_every_preset_runs_through_the_train_command_parser(tmp_path):
    from qwenvl_tune.commands import options, parser

    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        ns = parser().parse_args(["train", "--config", str(preset), "--data", str(tmp_path)])
        assert options(ns)["config"] == str(preset)


def test_unknown_key_is_rejected_with_suggestion(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rank'.*did you mean 'lora.r'"):
        build_config(y)
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        build_config(None, {"train.lrr": 1})


def test_types_are_checked_and_coerced():
    c = build_config(None, {"lora.r": "16", "lora.target_modules": "q_proj,k_proj", "data.skip_invalid": "true",
                            "train.limit_val_batches": "none"})
    assert c.lora.r == 16 and c.lora.target_modules == ["q_proj", "k_proj"] and c.data.skip_invalid is True
    with pytest.raises(ConfigError, match="lora.r must be an integer"):
        build_config(None, {"lora.r": "eight"})
    with pytest.raises(ConfigError, match="model.method must be one of"):
        build_config(None, {"model.method": "qlor"})
    with pytest.raises(ConfigError, match="min_pixels"):
        build_config(None, {"data.min_pixels": 10, "data.max_pixels": 5})


def test_round_trip_through_saved_dict():
    c = build_config(None, {"lora.r": 32, "data.system_message": "Read the page."})
    assert config_from_dict(c.to_dict()) == c


def test_cli_exposes_every_field_once_and_aliases():
    p = _parser()
    ns = p.parse_args(["train", "--data", "./D", "--method", "qlora", "--lora.r", "16", "--train.max_epochs", "3"])
    o = _overrides(ns)
    assert o == {"data.path": "./D", "model.method": "qlora", "lora.r": "16", "train.max_epochs": "3"}
    train = p._subparsers._group_actions[0].choices["train"]
    options = [o for a in train._actions for o in a.option_strings]
    for name, f, _ in iter_fields():
        assert options.count(f"--{name}") == 1, name
    assert "Peak learning rate" in train.format_help()  # field docs are the CLI help


def test_cli_unknown_option_gets_a_suggestion(capsys):
    from qwenvl_tune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--lora.rank", "4"])
    assert e.value.code == 2
    assert "did you mean 'lora.r'" in capsys.readouterr().err


def test_impossible_strategy_is_a_config_error_before_the_model_loads(sample_data, tiny_dir, tmp_path, monkeypatch):
    from conftest import ROOT, tiny_overrides
    from qwenvl_tune import api
    import qwenvl_tune.training.run as run_mod

    loaded = []
    monkeypatch.setattr(run_mod, "load_base_model", lambda *a, **k: loaded.append(1))
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{"train.strategy": "fsdp",
                                                                                "train.devices": 2}))
    with pytest.raises(ConfigError, match="train.strategy='fsdp'"):
        api.train(cfg)
    assert loaded == []


def test_missing_strategy_package_is_a_config_error_before_the_model_loads(sample_data, tiny_dir, tmp_path,
                                                                          monkeypatch):
    from conftest import tiny_overrides
    from qwenvl_tune import api
    import lightning_fabric.strategies.deepspeed as ds
    import qwenvl_tune.training.run as run_mod

    monkeypatch.setattr(ds, "_DEEPSPEED_AVAILABLE", False)  # as on a machine without the deepspeed extra
    loaded = []
    monkeypatch.setattr(run_mod, "load_base_model", lambda *a, **k: loaded.append(1))
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{"train.strategy": "deepspeed"}))
    with pytest.raises(ConfigError, match="train.strategy='deepspeed'.*DeepSpeed installed"):
        api.train(cfg)
    assert loaded == []


def test_a_mistyped_local_model_path_fails_at_once_without_a_run_folder(sample_data, tmp_path, capsys):
    from conftest import tiny_overrides
    from qwenvl_tune.cli import main

    (tmp_path / "models").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "adapter").mkdir()  # a run's best/: an adapter, whose base is elsewhere
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "/models/qwen-3b"}')
    for model, why in ((tmp_path / "models" / "qwen-typo", "no such folder"), (tmp_path / "empty", "no config.json"),
                       (tmp_path / "adapter", "holds a LoRA adapter, not a model: train from its base model "
                                              "(/models/qwen-3b), or from the adapter merged into it")):
        over = tiny_overrides(sample_data, model, tmp_path / "runs", **{"run.name": "r"})
        assert main(["train", *[f"--{k}={v}" for k, v in over.items()]]) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2-VL-2B-Instruct"])
def test_hub_ids_are_left_to_the_hub(name, tmp_path, monkeypatch):
    from qwenvl_tune.modeling.load import check_model_source

    monkeypatch.chdir(tmp_path)  # no folder named like the organisation here
    assert check_model_source(f" {name} ") == name


def test_learning_rate_default_depends_on_method_and_an_explicit_one_wins():
    assert build_config(None, {}).train.lr == 2e-4
    assert build_config(None, {"model.method": "qlora"}).train.lr == 2e-4
    assert build_config(None, {"model.method": "full"}).train.lr == 1e-5
    assert build_config(None, {"model.method": "full", "train.lr": "3e-5"}).train.lr == 3e-5
    # the resolved value is what the run folder records
    assert "lr: 1.0e-05" in build_config(None, {"model.method": "full"}).to_yaml()
    # the LoRA presets leave it unset, so switching a preset to full fine-tuning lowers it too
    assert build_config(ROOT / "configs" / "qwen2_5_vl_7b_lora.yaml", {"model.method": "full"}).train.lr == 1e-5


def test_the_demo_preset_is_the_one_the_package_ships():
    shipped = ROOT / "src" / "qwenvl_tune" / "assets" / "demo.yaml"
    assert (ROOT / "configs" / "demo.yaml").read_text() == shipped.read_text()


def test_the_console_shows_what_differs_from_the_defaults():
    c = build_config(None, {"model.method": "full", "lora.r": 8, "train.max_epochs": 3})
    changed = c.changed()
    assert changed == {"model.method": "full", "train.max_epochs": 3}  # lr follows the method; r is the default


def test_loader_workers_auto_shares_the_machine_s_cpus_among_its_training_processes(monkeypatch):
    import os

    from qwenvl_tune.config import ConfigError
    from qwenvl_tune.training.setup import loader_workers

    def workers(cpus, **overrides):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        return loader_workers(build_config(None, overrides))

    assert build_config(None, {}).data.num_workers == 2  # auto gave no gain on a 16-CPU H200 machine (LOG.md)
    n, said = workers(16, **{"data.num_workers": "auto"})
    assert n == 8 and "data.num_workers=auto: 8 loader worker(s)" in said and "16 CPUs, 1 training" in said
    auto = {"data.num_workers": "auto"}
    assert workers(16, **auto, **{"train.devices": 4})[0] == 3  # 16 CPUs over 4 processes, one left to each
    assert workers(128, **auto, **{"train.devices": 8})[0] == 8  # at most 8
    assert workers(2, **auto)[0] == 1 and workers(1, **auto)[0] == 1  # always one worker, off the training process
    assert workers(16, **{"data.num_workers": 0}) == (0, "")  # a number is taken as it is, and not announced
    assert workers(16, **{"data.num_workers": 3}) == (3, "")
    with pytest.raises(ConfigError, match="data.num_workers must be >= 0 or auto"):
        build_config(None, {"data.num_workers": -1}).validate()
