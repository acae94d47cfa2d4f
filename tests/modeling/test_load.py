import pytest
import torch

from qwenvl_tune.config import build_config
from qwenvl_tune.modeling.load import lora_targets, load_base_model, quantization_config, vision_module_names


def test_qlora_computes_in_bf16_nf4_double_quant():
    q = quantization_config(build_config(None, {"model.method": "qlora"}).model)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16  # the guide's misspelling left this at float32


def test_lora_targets_skip_vision_unless_trained(tiny_dir):
    cfg = build_config(None, {"model.name_or_path": str(tiny_dir), "model.dtype": "float32"})
    model = load_base_model(cfg.model)
    vision = vision_module_names(model)
    assert vision and any(n.endswith("visual") for n in vision)
    lm_only = lora_targets(model, ["all-linear"], include_vision=False)
    assert lm_only and not set(lm_only) & vision and not any("lm_head" in n for n in lm_only)
    with_vision = lora_targets(model, ["all-linear"], include_vision=True)
    assert set(with_vision) & vision
    with pytest.raises(ValueError, match="matched no Linear"):
        lora_targets(model, ["nope_proj"], include_vision=False)


def test_model_id_whitespace_is_stripped(tiny_dir):
    cfg = build_config(None, {"model.name_or_path": f"{tiny_dir} ", "model.dtype": "float32"})
    assert load_base_model(cfg.model) is not None


def test_liger_kernels_refuse_cleanly_without_a_gpu(tiny_dir, monkeypatch):
    from qwenvl_tune.config import ConfigError, build_config
    from qwenvl_tune.modeling.load import load_base_model, prepare_for_training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = build_config(None, {"model.name_or_path": str(tiny_dir), "model.kernels": "liger"})
    with pytest.raises(ConfigError, match="CUDA GPU"):
        prepare_for_training(load_base_model(cfg.model), cfg)
    with pytest.raises(ConfigError, match="model.kernels"):
        build_config(None, {"model.kernels": "triton"})


def test_auto_kernels_choose_liger_only_where_it_runs(tiny_dir, monkeypatch, capsys):
    import importlib.util

    from qwenvl_tune.config import build_config
    from qwenvl_tune.modeling import kernels
    from qwenvl_tune.modeling.fastpath import FastPath
    from qwenvl_tune.modeling.load import load_base_model, prepare_for_training

    cfg = build_config(None, {"model.name_or_path": str(tiny_dir), "model.dtype": "float32"})
    assert cfg.model.kernels == "auto"
    model = load_base_model(cfg.model)
    family = model.config.model_type
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.resolve_kernels("auto", family) == ("none", "no CUDA GPU")
    fast = FastPath.resolve(cfg.model, model.config)
    assert fast.kernels == "none" and "kernels: none (no CUDA GPU)" in fast.describe()  # trains without, says why
    prepare_for_training(model, cfg, fast)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    chosen, why = kernels.resolve_kernels("auto", family)
    assert chosen == "none" and "pip install 'qwenvl-tune[kernels]'" in why
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    assert kernels.resolve_kernels("auto", family)[0] == "liger"
    assert kernels.resolve_kernels("auto", "llava")[0] == "none"
    assert kernels.resolve_kernels("none", family) == ("none", "asked for")
