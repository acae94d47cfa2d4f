"""The fast training path computes the plain path's loss and gradients."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AttentionInterface

from conftest import tiny_overrides
from qwenvl_tune.config import build_config
from qwenvl_tune.data.collate import Encoder, collate
from qwenvl_tune.modeling.generate import MODEL_INPUTS
from qwenvl_tune.modeling import align as falign, attention as fattn, loss as floss
from qwenvl_tune.modeling.fastpath import FastPath
from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training


def _batch(proc, pages: int = 1, vision=None):
    enc = Encoder(proc)
    items = [enc.encode_train([Image.new("RGB", (300 + 60 * i + 90 * k, 400 - 50 * k), (40 * i, 90, 20 + 60 * k))
                               for k in range(pages)], "extract", f'{{"n": "{i}" }}' * (i + 1))
             for i in range(3)]
    return collate(items, enc.pad_id, left=False, vision=vision)


def _same_loss_and_grads(results):
    (l0, g0), (l1, g1) = results[False], results[True]
    assert torch.allclose(l0, l1, rtol=1e-5), (l0, l1)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_fast_path_with_two_pages_per_sample_matches_the_plain_path(tiny_family, tmp_path, family):
    """Several images per sample: loader-side rope positions and vision indices, varlen vision attention and
    answer-only logits give the plain model's loss and LoRA gradients."""
    from qwenvl_tune.data.positions import VisionIndex

    ckpt = tiny_family(family)
    results = {}
    for fast_path in (False, True):
        cfg = build_config(None, tiny_overrides(tmp_path, ckpt, tmp_path, **{
            "model.fast_path": fast_path, "model.method": "lora", "lora.target_modules": "all-linear",
            "data.min_pixels": 16 * 28 * 28, "data.max_pixels": 64 * 28 * 28}))
        proc = load_processor(ckpt, cfg.data.min_pixels, cfg.data.max_pixels)
        torch.manual_seed(0)
        model = prepare_for_training(load_base_model(cfg.model), cfg)
        batch = _batch(proc, pages=2, vision=VisionIndex.for_config(model.config) if fast_path else None)
        assert len(batch["image_grid_thw"]) == 6  # three samples, two pages each
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if fast_path:
            inputs.update({k: v for k, v in batch.items() if k == "position_ids" or k.startswith("image_")
                           and k != "image_grid_thw"})
            loss = floss.answer_only_loss(model, inputs, batch["labels"], batch["answer_positions"])
        else:
            loss = model(**inputs, labels=batch["labels"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fast_path] = (loss.detach(), grads)
    fattn.register()
    _same_loss_and_grads(results)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_path_matches_plain_loss_and_grads(tiny_dir, tmp_path, method, monkeypatch):
    results = {}
    calls = []
    original = fattn.varlen_attention_forward
    for fast_path in (False, True):
        cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{
            "model.fast_path": fast_path, "model.method": method, "lora.target_modules": "all-linear",
            "data.min_pixels": 64 * 28 * 28, "data.max_pixels": 64 * 28 * 28}))
        proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
        torch.manual_seed(0)
        model = prepare_for_training(load_base_model(cfg.model), cfg)
        if fast_path:
            def counting(*a, **k):
                calls.append(k.get("cu_seq_lens_q") is not None)
                return original(*a, **k)
            # the frozen tower's attention module calls it directly (the library's module, through the registry)
            monkeypatch.setattr(fattn, "varlen_attention_forward", counting)
            AttentionInterface.register(fattn.VARLEN_ATTENTION, counting)
        batch = _batch(proc)
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if fast_path:
            loss = floss.answer_only_loss(model, inputs, batch["labels"])
        else:
            loss = model(**inputs, labels=batch["labels"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fast_path] = (loss.detach(), grads)
    fattn.register()
    _same_loss_and_grads(results)
    # the vision tower called the varlen function once per layer with the window boundaries
    assert calls and all(calls) and len(calls) == 2  # tiny vision tower: 2 blocks, one call each


@pytest.mark.parametrize("chunk", [floss.LOSS_CHUNK, 7])
def test_answer_only_loss_uses_few_logits(tiny_dir, tmp_path, monkeypatch, chunk):
    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{"lora.dropout": 0.0}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    batch = _batch(proc)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    whole = floss.answer_only_loss(model, inputs, batch["labels"], chunked=False)
    whole.backward()
    whole_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(floss, "LOSS_CHUNK", chunk)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[:-1].numel()))
    loss = floss.answer_only_loss(model, inputs, batch["labels"])
    loss.backward()
    hook.remove()
    supervised = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert supervised < batch["input_ids"].shape[1] / 2
    # no logits in the forward pass; then the answer positions, chunk by chunk, once more in backward
    assert rows[0] == 0 and max(rows) <= chunk
    assert sum(rows[1:]) == 2 * supervised * batch["input_ids"].shape[0]
    assert torch.allclose(whole, loss, rtol=1e-6), (whole, loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == whole_grads.keys() and grads
    for n in grads:
        assert torch.allclose(grads[n], whole_grads[n], rtol=1e-5, atol=1e-7), n


def _vision_mlps(model):
    return [m for m in falign.vision_tower(model).modules() if hasattr(m, "down_proj")]


def test_aligned_vision_mlp_computes_the_published_model(tiny_dir, tmp_path):
    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    batch = _batch(proc)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    model = load_base_model(cfg.model)
    published = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(**inputs).logits
    # the tiny tower's MLP is 32 -> 60 -> 32, unaligned like the real 1280 -> 3420 -> 1280
    assert [m.down_proj.in_features for m in _vision_mlps(model)] == [60, 60]

    assert falign.align_vision_mlp(model) == 2
    assert falign.align_vision_mlp(model) == 0  # already aligned
    for m in _vision_mlps(model):
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (64, 32) and m.down_proj.weight.shape == (32, 64)
        assert not m.gate_proj.weight[60:].any() and not m.down_proj.weight[:, 60:].any()
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)

    # the state dict keeps the published shapes and values, and loads back in
    state = model.state_dict()
    assert state.keys() == published.keys()
    for k in published:
        assert torch.equal(state[k], published[k]), k
    model.load_state_dict(published)
    assert _vision_mlps(model)[0].down_proj.weight.shape == (32, 64)
    # a checkpoint saved from the padded model is the published architecture
    model.save_pretrained(tmp_path / "saved")
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert _vision_mlps(reloaded)[0].down_proj.weight.shape == (32, 60)
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, before, atol=1e-5, rtol=1e-5)

    # if the tower is trained, the extra units get exactly zero gradient, so they stay zero
    for p in falign.vision_tower(model).parameters():
        p.requires_grad_(True)
    model(**inputs).logits.square().mean().backward()
    mlp = _vision_mlps(model)[0]
    assert mlp.gate_proj.weight.grad[:60].abs().sum() > 0
    assert not mlp.gate_proj.weight.grad[60:].any() and not mlp.up_proj.bias.grad[60:].any()
    assert not mlp.down_proj.weight.grad[:, 60:].any()


def test_align_vision_mlp_leaves_aligned_towers_and_other_activations(tiny_family):
    for family in ("qwen2_vl", "qwen3_vl"):  # published widths 5120 and 4304 are aligned; so are the tiny ones
        cfg = build_config(None, {"model.name_or_path": str(tiny_family(family)), "model.dtype": "float32"})
        model = load_base_model(cfg.model)
        assert falign.vision_tower(model) is not None
        assert falign.align_vision_mlp(model) == 0

    class Mlp(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.fc1, self.fc2, self.act = torch.nn.Linear(4, 6), torch.nn.Linear(6, 4), act

    class Model(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.visual = torch.nn.Sequential(Mlp(act))

    assert falign.align_vision_mlp(Model(torch.nn.GELU())) == 1
    assert falign.align_vision_mlp(Model(torch.nn.Sigmoid())) == 0  # sigmoid(0) = 0.5: padding would change the output


@pytest.mark.parametrize("overrides,fsdp,aligned", [
    ({}, False, True),
    ({"model.fast_path": False}, False, False),
    ({"model.train_vision": True}, False, False),
    ({}, True, False),
])
def test_training_aligns_the_frozen_tower_on_the_fast_path(tiny_dir, tmp_path, overrides, fsdp, aligned):
    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **overrides))
    base = load_base_model(cfg.model)
    fast = FastPath.resolve(cfg.model, base.config, fsdp=fsdp)
    assert fast.align_vision_mlp is aligned
    assert aligned or any("not padded" in n or "fast_path=false" in n for n in fast.notes)  # said why
    model = prepare_for_training(base, cfg, fast)
    widths = {m.down_proj.in_features for m in _vision_mlps(model)}
    assert widths == ({64} if aligned else {60})


def test_lora_branches_take_bf16_input_under_autocast(tiny_dir, tmp_path):
    """Under mixed precision the LoRA input is not copied to float32 (autocast would cast it straight back);
    loss and gradients are those of PEFT's casting path."""
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{
            "model.dtype": "bfloat16", "train.precision": precision, "lora.dropout": 0.0}))
        proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
        torch.manual_seed(0)
        base = load_base_model(cfg.model)
        fast = FastPath.resolve(cfg.model, base.config, autocast=precision == "bf16-mixed")
        model = prepare_for_training(base, cfg, fast)
        seen = []
        for name, m in model.named_modules():
            if name.endswith("lora_A.default"):
                m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
        batch = _batch(proc)
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16), fast.training(model):
            loss = floss.answer_only_loss(model, inputs, batch["labels"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[precision] = (loss.detach(), grads, set(seen))
    (l0, g0, seen0), (l1, g1, seen1) = results["32-true"], results["bf16-mixed"]
    assert seen0 == {torch.float32} and seen1 == {torch.bfloat16}
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        assert g0[n].dtype == torch.float32  # the adapters' master weights stay float32
        assert torch.equal(g0[n], g1[n]), n


def test_fast_path_object_resolves_each_flag_and_says_why():
    from types import SimpleNamespace

    from qwenvl_tune.config import ModelConfig

    hf = SimpleNamespace(model_type="qwen2_5_vl", vision_config=None)
    on = FastPath.resolve(ModelConfig(kernels="none"), hf, autocast=True, cuda=False)
    assert on.vision_varlen and on.align_vision_mlp and on.answer_only_loss and on.chunked_loss and on.lora_bf16_inputs
    assert not on.flash_sdpa  # a CUDA switch: nothing to change on a CPU
    fsdp = FastPath.resolve(ModelConfig(kernels="none"), hf, fsdp=True, autocast=False, cuda=False)
    assert not fsdp.chunked_loss and not fsdp.align_vision_mlp and not fsdp.lora_bf16_inputs
    assert any("FSDP" in n for n in fsdp.notes) and any("autocast" in n for n in fsdp.notes)
    off = FastPath.resolve(ModelConfig(fast_path=False, kernels="none"), hf, cuda=False)
    assert not any([off.vision_varlen, off.align_vision_mlp, off.loader_indices, off.answer_only_loss])
    assert "align_vision_mlp" not in off.replace().describe().split("\n")[0]
    assert on.replace(align_vision_mlp=False).align_vision_mlp is False and on.align_vision_mlp  # ablations copy


def test_an_unrecognised_mlp_layout_is_reported_not_silently_skipped(tiny_dir, capsys):
    from qwenvl_tune.modeling.load import load_base_model as load

    cfg = build_config(None, {"model.name_or_path": str(tiny_dir), "model.dtype": "float32"})
    model = load(cfg.model)
    for mlp in _vision_mlps(model):  # as if a transformers release renamed the attribute
        mlp.renamed_down_proj = mlp.down_proj
        del mlp.down_proj
    lines = FastPath.resolve(cfg.model, model.config, cuda=False).apply(model)
    assert any(line.startswith("warning: 0 vision MLPs padded") for line in lines), lines


def test_an_already_aligned_tower_gets_no_warning(tiny_dir):
    """A Qwen2.5-VL whose vision MLP width is already a multiple of 8 (a small or custom config) has nothing to pad:
    the log says so instead of warning of an unrecognised layout (as it did for bench/ddp_speed.py's tiny model)."""
    from qwenvl_tune.modeling.load import load_base_model as load

    cfg = build_config(None, {"model.name_or_path": str(tiny_dir), "model.dtype": "float32"})
    model = load(cfg.model)
    fast = FastPath.resolve(cfg.model, model.config, cuda=False)
    assert fast.apply(model) and falign.align_vision_mlp(model) == 0  # the first apply padded 60 -> 64
    lines = fast.apply(model)
    assert "vision MLP: already aligned" in lines and not any(line.startswith("warning") for line in lines), lines


def test_flash_sdpa_switch_is_restored(monkeypatch):
    from qwenvl_tune.modeling.attention import flash_sdpa

    state = {"cudnn": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: state["cudnn"])
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: state.update(cudnn=on))
    with flash_sdpa(True):
        assert state["cudnn"] is False
    assert state["cudnn"] is True


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_frozen_vision_attention_module_computes_the_library_tower_exactly(tiny_family, tmp_path, family):
    """The swapped attention (same qkv/proj parameters, the library's rotary, one varlen call) gives the library
    tower's image features bit for bit on two pages, keeps the state-dict keys, and is found in every block."""
    from qwenvl_tune.data.positions import VisionIndex

    ckpt = tiny_family(family)
    cfg = build_config(None, tiny_overrides(tmp_path, ckpt, tmp_path, **{
        "data.min_pixels": 16 * 28 * 28, "data.max_pixels": 64 * 28 * 28}))
    proc = load_processor(ckpt, cfg.data.min_pixels, cfg.data.max_pixels)
    model = load_base_model(cfg.model)
    fattn.enable_fast_vision_attention(model)
    batch = _batch(proc, pages=2, vision=VisionIndex.for_config(model.config))
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    inputs.update({k: v for k, v in batch.items() if k == "position_ids" or k.startswith("image_")
                   and k != "image_grid_thw"})
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(**inputs).logits
    tower = falign.vision_tower(model)
    assert fattn.swap_frozen_vision_attention(model) == len(tower.blocks) > 0
    assert fattn.swap_frozen_vision_attention(model) == 0  # already swapped
    assert all(isinstance(b.attn, fattn.FrozenVisionAttention) for b in tower.blocks)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)


def test_frozen_vision_attention_is_on_for_a_frozen_tower_only(tiny_dir, tmp_path):
    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path))
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    assert all(isinstance(b.attn, fattn.FrozenVisionAttention) for b in falign.vision_tower(model).blocks)
    trained = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{"model.train_vision": True}))
    model = prepare_for_training(load_base_model(trained.model), trained)
    assert not any(isinstance(b.attn, fattn.FrozenVisionAttention) for b in falign.vision_tower(model).blocks)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_fused_rms_norm_computes_the_library_norm(tiny_family, family):
    """PyTorch's rms_norm behind the swapped module: the library's values (float32: to rounding; bf16: to the
    last bit of the double rounding the library does), the same gradients, the same state-dict keys, and
    bf16 out under autocast as the library's module gives (autocast would otherwise run it in float32)."""
    from qwenvl_tune.modeling import kernels as fk
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_family(family), dtype=torch.float32)
    norms = [(n, m) for n, m in model.named_modules() if type(m).__name__ in fk.RMS_NORM_CLASSES]
    assert norms, "the tiny model has RMSNorm modules"
    keys = set(model.state_dict())
    name, lib = norms[0]
    with torch.no_grad():
        lib.weight.copy_(torch.linspace(0.5, 1.5, lib.weight.numel()))
    torch.manual_seed(0)
    x = torch.randn(3, 7, lib.weight.numel(), requires_grad=True)
    ref = lib(x)
    ref.square().sum().backward()
    ref_grad, x.grad = x.grad.clone(), None
    assert fk.use_fused_rms_norm(model) == len(norms)
    assert set(model.state_dict()) == keys
    fused = model.get_submodule(name)
    assert isinstance(fused, fk.FusedRMSNorm) and fused.weight is lib.weight
    out = fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-4, atol=1e-5)

    lib16, fused16 = lib.to(torch.bfloat16), fk.FusedRMSNorm(lib.to(torch.bfloat16))
    xb = x.detach().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused16(xb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), lib16(xb).float(), rtol=1.6e-2, atol=1e-2)
    # mixed dtypes (a float32 weight on a bf16 input, as k-bit preparation leaves it) take the library's arithmetic
    mixed = fk.FusedRMSNorm(lib.float())
    assert torch.equal(mixed(xb), lib.float()(xb))


def test_fused_rms_norm_also_takes_liger_s_class_when_a_liger_patch_replaced_the_library_s():
    """Liger's patch replaces the library's RMSNorm class for the whole process: a model loaded after it is built
    with Liger's class, which is swapped too when its arithmetic is the library's (offset 0, Llama casting), and
    left alone otherwise (Gemma's 1 + weight)."""
    from qwenvl_tune.modeling import kernels as fk

    class LigerRMSNorm(torch.nn.Module):  # liger-kernel's class's attributes (the package needs a GPU)
        def __init__(self, n, offset=0.0, casting_mode="llama"):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))
            self.variance_epsilon, self.offset, self.casting_mode = 1e-6, offset, casting_mode

    model = torch.nn.ModuleDict({"a": LigerRMSNorm(8), "b": LigerRMSNorm(8, 1.0, "gemma"), "c": torch.nn.LayerNorm(8)})
    assert fk.use_fused_rms_norm(model) == 1
    assert isinstance(model["a"], fk.FusedRMSNorm) and type(model["b"]).__name__ == "LigerRMSNorm"


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_training_step_builds_no_key_value_cache(tiny_dir, tmp_path, monkeypatch, fast_path):
    """With the config's use_cache the language model fills a DynamicCache in training too (a copy of every layer's
    keys and values, two cat calls a layer); the step asks for none, on both paths."""
    from transformers import cache_utils

    from qwenvl_tune.data.positions import VisionIndex
    from qwenvl_tune.training.step import TrainStep

    updates = []
    real = cache_utils.DynamicCache.update
    monkeypatch.setattr(cache_utils.DynamicCache, "update",
                        lambda self, *a, **k: updates.append(1) or real(self, *a, **k))
    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{"model.fast_path": fast_path}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    assert model.config.get_text_config().use_cache  # the default that would build one
    fast = FastPath.resolve(cfg.model, model.config, cuda=False)
    batch = _batch(proc, vision=VisionIndex.for_config(model.config) if fast_path else None)
    TrainStep(model.train(), fast)(batch).backward()
    assert updates == []
    with torch.no_grad():  # the check can see one: the model's own forward builds it
        model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
    assert updates
