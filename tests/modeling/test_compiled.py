"""Compiled decoder layers (``model.compile``): the same loss and gradients as the eager layers, compiled once for
every later length, and never used outside a training forward pass."""

from __future__ import annotations

import pytest
import torch

from conftest import step_loss_and_grads as _loss_and_grads, tiny_overrides
from qwenvl_tune.config import build_config
from qwenvl_tune.data.check import check_split
from qwenvl_tune.data.collate import RecordDataset, TrainCollator
from qwenvl_tune.modeling import compiled as fcompiled
from qwenvl_tune.modeling.fastpath import FastPath
from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training
from qwenvl_tune.training.setup import _encoder_and_vision
from qwenvl_tune.training.step import TrainStep


@pytest.fixture(autouse=True)
def _graph_capture_on_cpu(monkeypatch):
    """The graph capture and autograd split of Inductor, with eager kernels (Inductor's own are run on the GPU,
    tests/test_gpu.py); a fresh compile cache for each test."""
    monkeypatch.setattr(fcompiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _setup(data, ckpt, tmp_path, **extra):
    cfg = build_config(None, tiny_overrides(data, ckpt, tmp_path, **{"lora.target_modules": "all-linear",
                                                                       "train.image_cache_gib": 0, **extra}))
    proc = load_processor(ckpt, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    fast = FastPath.resolve(cfg.model, model.config, cuda=False)
    enc, vision = _encoder_and_vision(cfg, proc, fast)
    rows = RecordDataset(check_split(data, "train").records, enc, "train")
    return model.train(), fast, rows, TrainCollator(enc.pad_id, vision)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_compiled_layers_give_the_eager_loss_and_gradients_and_compile_once_for_all_lengths(
        family, tiny_family, sample_data, tmp_path):
    from torch._dynamo.utils import counters

    model, fast, rows, collate = _setup(sample_data, tiny_family(family), tmp_path, **{"model.compile": "on"})
    assert fast.compile_layers and fast.compile_vision and not fast.liger_language_model
    eager, compiled = TrainStep(model, fast.replace(compile_layers=False)), TrainStep(model, fast)
    assert compiled.compiled is not None
    assert len(compiled.compiled.text) == model.config.get_text_config().num_hidden_layers
    assert len(compiled.compiled.vision) == model.config.vision_config.depth

    batches = [collate([rows[i], rows[i + 1]]) for i in range(0, 6, 2)]
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert len(set(lengths)) == 3, lengths
    graphs = []
    for batch in batches:
        want, got = _loss_and_grads(eager, batch), _loss_and_grads(compiled, batch)
        graphs.append(counters["stats"]["unique_graphs"])
        assert torch.equal(want[0], got[0]), (want[0], got[0])
        assert want[1].keys() == got[1].keys() and len(want[1]) > 10
        assert all(torch.equal(want[1][n], got[1][n]) for n in want[1]), \
            [n for n in want[1] if not torch.equal(want[1][n], got[1][n])]
    assert graphs[0] > 0, "the compiled layers ran"
    # the second length recompiles with the length symbolic; the third reuses that graph
    assert graphs[2] == graphs[1], graphs
    assert all(layer._compiled_call_impl is None for layer in compiled.compiled.layers)


def test_compiled_4bit_vision_blocks_give_the_eager_loss_and_gradients(tiny_dir, sample_data, tmp_path):
    """QLoRA's frozen tower is 4-bit: its blocks are not compiled by default until a GPU measures them
    (``FastPath.compile_vision``); compiled, bitsandbytes' products are traced into the graphs and the step is
    unchanged, so the benchmark's ``ours_qlora_b2_liger_compiled_vision`` measures a correct path."""
    bnb = pytest.importorskip("bitsandbytes")
    from torch._dynamo.utils import counters

    model, fast, rows, collate = _setup(sample_data, tiny_dir, tmp_path, **{
        "model.compile": "on", "model.method": "qlora", "model.dtype": "bfloat16", "lora.target_modules": "q_proj,v_proj"})
    assert fast.compile_layers and not fast.compile_vision  # the product's choice today
    fast = fast.replace(compile_vision=True)
    compiled = TrainStep(model, fast)
    eager = TrainStep(model, fast.replace(compile_layers=False, compile_vision=False))
    blocks = compiled.compiled.vision
    assert len(blocks) == model.config.vision_config.depth
    assert sum(isinstance(m, bnb.nn.Linear4bit) for b in blocks for m in b.modules()) >= 4 * len(blocks)
    for i in (0, 2):
        batch = collate([rows[i], rows[i + 1]])
        want, got = _loss_and_grads(eager, batch), _loss_and_grads(compiled, batch)
        assert torch.equal(want[0], got[0]), (want[0], got[0])
        assert want[1].keys() == got[1].keys() and all(torch.equal(want[1][n], got[1][n]) for n in want[1])
    assert counters["stats"]["unique_graphs"] > 0


def test_generation_and_evaluation_run_the_layers_eagerly(tiny_dir, sample_data, tmp_path):
    from torch._dynamo.utils import counters

    model, fast, rows, collate = _setup(sample_data, tiny_dir, tmp_path, **{"model.compile": "on"})
    step = TrainStep(model, fast)
    batch = collate([rows[0], rows[1]])
    _loss_and_grads(step, batch)
    frames = counters["stats"]["calls_captured"]
    assert frames > 0

    step.eval()
    with torch.no_grad():
        step(batch)  # a validation loss
        out = step.generate(input_ids=batch["input_ids"][:1, :40], attention_mask=torch.ones_like(
            batch["input_ids"][:1, :40]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 43
    assert counters["stats"]["calls_captured"] == frames, "nothing was compiled outside training"


def test_model_compile_setting_resolves_per_machine_and_method(tiny_dir, tmp_path):
    from qwenvl_tune.modeling.load import load_model_config

    hf = load_model_config(tiny_dir)

    def resolve(cuda, **over):
        cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **over))
        return FastPath.resolve(cfg.model, hf, cuda=cuda)

    assert resolve(True).compile_layers and not resolve(True).liger_language_model
    assert "take longer (model.compile=off to skip)" in resolve(True).describe()
    off = resolve(False)
    assert not off.compile_layers and off.liger_language_model
    assert any("no CUDA GPU" in n and "model.compile=on" in n for n in off.notes)
    assert resolve(False, **{"model.compile": "on"}).compile_layers
    assert not resolve(True, **{"model.compile": "off"}).compile_layers
    assert resolve(True).compile_vision and not resolve(True, **{"model.train_vision": True}).compile_vision
    qlora = resolve(True, **{"model.method": "qlora", "model.dtype": "bfloat16"})
    assert qlora.compile_layers and not qlora.compile_vision and any("QLoRA" in n for n in qlora.notes)
    assert qlora.compiled_4bit and not resolve(True).compiled_4bit  # 4-bit products unpacked in the graphs
    assert not resolve(False, **{"model.method": "qlora", "model.dtype": "bfloat16"}).compiled_4bit  # none compiled
    gc = resolve(True, **{"model.gradient_checkpointing": True})
    assert not gc.compile_layers and any("gradient checkpointing" in n for n in gc.notes)
    fsdp = FastPath.resolve(build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path)).model, hf, cuda=True,
                            fsdp=True)
    assert not fsdp.compile_layers
    assert not resolve(True, **{"model.fast_path": False}).compile_layers


def test_kept_image_features_reuse_the_compiled_graphs(tiny_dir, sample_data, tmp_path):
    """A later epoch's batch (image features kept, so no vision-tower indices) runs the graphs of the first: the
    tower's ``image_*`` arguments never reach a compiled layer, and the numbers are the eager ones."""
    from torch._dynamo.utils import counters

    from qwenvl_tune.training.features import ImageFeatureCache

    model, fast, rows, collate = _setup(sample_data, tiny_dir, tmp_path, **{"model.compile": "on"})
    step = TrainStep(model, fast, ImageFeatureCache(model, 1.0))
    eager = TrainStep(model, fast.replace(compile_layers=False))
    batch = collate([rows[0], rows[1]])
    first = _loss_and_grads(step, batch)  # runs the tower, keeps its output
    graphs = counters["stats"]["unique_graphs"]
    second = _loss_and_grads(step, batch)  # kept features: no tower, no image_* inputs
    assert step.features.hits == 2 and counters["stats"]["unique_graphs"] == graphs
    want = _loss_and_grads(eager, batch)
    for got in (first, second):
        assert torch.equal(want[0], got[0]) and all(torch.equal(want[1][n], got[1][n]) for n in want[1])


@pytest.mark.slow
def test_a_compiled_run_equals_the_eager_run_and_resumes_exactly(sample_data, tiny_dir, tmp_path):
    """``qwenvl-tune train`` with ``model.compile=on``: the same losses as with eager layers, validation and
    generation between epochs, and a run resumed from a mid-run checkpoint ends with the same adapter bit for bit."""
    import shutil

    from safetensors.torch import load_file

    from qwenvl_tune import api
    from training.test_resume import _cfg, _losses

    kw = {"train.check_val_every_n_epoch": 1, "generate.max_new_tokens": 4, "train.max_steps": 5,
          "train.keep_checkpoints": 5}
    eager = _losses(api.train(_cfg(sample_data, tiny_dir, tmp_path, "eager", **{**kw, "model.compile": "off"})))
    full = api.train(_cfg(sample_data, tiny_dir, tmp_path, "full", **{**kw, "model.compile": "on"}))
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] > 0, "the run compiled its layers"
    assert _losses(full) == eager and len(eager) == 5
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for p in [cut / "logs", cut / "last", *(q for q in (cut / "checkpoints").glob("step=*")
                                           if not q.name.startswith("step=0000003-"))]:
        shutil.rmtree(p)
    api.train(_cfg(sample_data, tiny_dir, tmp_path, "cut", **{**kw, "model.compile": "on"}), resume=str(cut))
    assert sorted(_losses(cut)) == [3, 4] and all(_losses(cut)[s] == eager[s] for s in (3, 4))
    a, b = (load_file(r / "last" / "adapter_model.safetensors") for r in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
