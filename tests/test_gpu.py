"""GPU-only checks, run on the GPU machine with `make test-gpu` (skipped on CPU, with the reason)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ENV, equal_length_data, tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_varlen_vision_attention_matches_per_window_sdpa():
    from qwenvl_tune.modeling.attention import varlen_attention_forward

    torch.manual_seed(0)
    lengths = [64, 64, 16, 64, 48, 256]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(1, 16, sum(lengths), 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, _ = varlen_attention_forward(None, q, k, v, None, scaling=80 ** -0.5, cu_seq_lens_q=cu, max_length_q=256)
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref.append(F.scaled_dot_product_attention(q[:, :, s:e].float(), k[:, :, s:e].float(), v[:, :, s:e].float(),
                                                  scale=80 ** -0.5).transpose(1, 2))
    ref = torch.cat(ref, dim=1)
    assert out.shape == ref.shape
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


def test_qlora_base_is_4bit_with_bf16_compute(tiny_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from qwenvl_tune.config import build_config
    from qwenvl_tune.modeling.load import load_base_model, prepare_for_training

    cfg = build_config(None, {"model.name_or_path": str(tiny_dir), "model.method": "qlora"})
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    # PEFT's LoRA wrapper class is also called Linear4bit; the quantised base layers are bnb's.
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit
    assert all(m.compute_dtype == torch.bfloat16 for m in four_bit)


def test_auto_batch_size_probes_the_card_and_trains_with_what_it_chose(tiny_dir, sample_data, tmp_path, capsys):
    import yaml

    from qwenvl_tune import api
    from qwenvl_tune.config import build_config

    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "model.dtype": "bfloat16", "train.precision": "bf16-mixed", "train.accelerator": "gpu",
        "train.batch_size": "auto", "train.max_steps": 2}))
    run = api.train(cfg)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("train.batch_size=auto: "))
    chosen = int(line.split(": ")[1].split()[0])
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    # a tiny model: every size up to the 6 training samples fits; the peaks it measured are stated
    assert chosen == 6 and saved["batch_size"] == 6 and "6: " in line and "GiB" in line
    assert saved["accumulate_grad_batches"] == 1  # the test's own setting (tiny_overrides), kept


def test_qlora_trains_end_to_end_on_gpu(tiny_dir, sample_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from qwenvl_tune import api
    from qwenvl_tune.config import build_config

    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "model.method": "qlora", "model.dtype": "bfloat16", "train.precision": "bf16-mixed",
        "train.accelerator": "gpu", "train.max_steps": 4, "train.lr": 1e-3}))
    run = api.train(cfg)
    assert (run / "best" / "adapter_model.safetensors").exists()
    rows = api.predict(run, [sorted((sample_data / "valid").glob("*.jpg"))[0]])
    assert isinstance(rows[0]["output"], str)


def _two_sample_batch(tiny_dir):
    """A right-padded training batch of two documents on the GPU: (model inputs, labels)."""
    from PIL import Image

    from qwenvl_tune.data.collate import Encoder, collate
    from qwenvl_tune.modeling.load import load_processor

    enc = Encoder(load_processor(tiny_dir, 64 * 28 * 28, 64 * 28 * 28))
    batch = collate([enc.encode_train(Image.new("RGB", (300, 400), (i * 80, 30, 30)), "x", '{"a": "%d"}' % i)
                     for i in range(2)], enc.pad_id, left=False)
    inputs = {k: batch[k].cuda() for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    return inputs, batch["labels"].cuda()


def test_fast_path_matches_plain_on_gpu(tiny_dir, tmp_path):
    from qwenvl_tune.modeling.loss import answer_only_loss
    from qwenvl_tune.modeling.attention import enable_fast_vision_attention
    from transformers import AutoModelForImageTextToText

    inputs, labels = _two_sample_batch(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.bfloat16).cuda()
    plain = model(**inputs, labels=labels).loss
    enable_fast_vision_attention(model)
    fast = answer_only_loss(model, inputs, labels)
    assert abs(float(plain) - float(fast)) / float(plain) < 1e-2


def test_liger_kernels_match_plain_loss_and_lora_grads(tiny_dir, monkeypatch):
    pytest.importorskip("liger_kernel")
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mod

    from qwenvl_tune.config import build_config
    from qwenvl_tune.modeling.loss import answer_only_loss
    from qwenvl_tune.modeling.load import load_base_model, prepare_for_training

    for name in ("apply_multimodal_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2_5_VLRMSNorm", "Qwen2MLP"):
        if hasattr(mod, name):  # Liger patches these module globals: restored after the test
            monkeypatch.setattr(mod, name, getattr(mod, name))
    inputs, labels = _two_sample_batch(tiny_dir)

    def run(kernels: str):
        cfg = build_config(None, {"model.name_or_path": str(tiny_dir), "model.dtype": "bfloat16",
                                  "lora.dropout": 0.0, "lora.target_modules": "all-linear", "model.kernels": kernels})
        torch.manual_seed(0)
        model = prepare_for_training(load_base_model(cfg.model), cfg).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as the trainer runs it (train.precision=bf16-mixed)
            loss = answer_only_loss(model, inputs, labels)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad])
        return float(loss), grads

    plain_loss, plain_grads = run("none")
    liger_loss, liger_grads = run("liger")
    assert abs(plain_loss - liger_loss) / plain_loss < 1e-2
    assert plain_grads.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(plain_grads, liger_grads, dim=0) > 0.99


def _cli_train(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "qwenvl_tune.cli", "train", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _gpu_train(data, model, out, name, devices, strategy, **extra):
    over = tiny_overrides(data, model, out, **{
        "run.name": name, "train.accelerator": "gpu", "train.devices": devices, "train.strategy": strategy,
        "train.batch_size": 2, "train.max_steps": 3, "train.lr": 2e-2, "lora.dropout": 0.0,
        "generate.max_new_tokens": 12, **extra})
    _cli_train(*[f"--{k}={v}" for k, v in over.items()])
    return Path(out) / name


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@two_gpus
def test_fsdp_full_finetune_matches_ddp_and_resumes(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    data, runs = equal_length_data(tmp_path), tmp_path / "runs"
    ddp = _gpu_train(data, tiny_dir, runs, "ddp", 2, "ddp", **{"model.method": "full"})
    fsdp = _gpu_train(data, tiny_dir, runs, "fsdp", 2, "fsdp", **{"model.method": "full"})
    a, b = load_file(ddp / "last" / "model.safetensors"), load_file(fsdp / "last" / "model.safetensors")
    base = load_file(tiny_dir / "model.safetensors")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert changed  # it trained, and the FSDP weights were gathered whole on rank 0
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k
    # sharded trainer state: a folder of shards. Cut the run back to its step-2 checkpoint (same LR schedule)
    # and resume: it reaches the same step-3 weights.
    cut = runs / "cut"
    shutil.copytree(fsdp, cut)
    shutil.rmtree(cut / "last")
    for p in (cut / "checkpoints").glob("step=*"):
        if not p.name.startswith("step=0000002"):
            shutil.rmtree(p)
    step2 = cut / "checkpoints" / "step=0000002-epoch=000"
    assert (step2 / "trainer_state.ckpt").is_dir()
    w2 = load_file(step2 / "model.safetensors")
    _cli_train("--resume", str(cut))
    c = load_file(cut / "last" / "model.safetensors")
    # The resumed step 3 must be the uninterrupted run's step 3. bf16 compute on a GPU is not bit-for-bit
    # repeatable, so compare against the size of that step's update: a lost optimizer state (Adam's
    # first step is lr * sign(grad)) or a restarted LR schedule would be off by a sizeable part of it.
    for k in b:
        update = (b[k].float() - w2[k].float()).norm()
        if update > 0:
            assert (c[k].float() - b[k].float()).norm() < 0.05 * update, (k, float(update))


@two_gpus
def test_fsdp_lora_on_bf16_base_matches_ddp(tiny_dir, tmp_path):
    # PEFT keeps the adapters in float32 on the bf16 base: they become FSDP units of their own
    from safetensors.torch import load_file

    data, runs = equal_length_data(tmp_path), tmp_path / "runs"
    bf16 = {"model.dtype": "bfloat16", "train.precision": "bf16-mixed", "lora.target_modules": "all-linear"}
    ddp = _gpu_train(data, tiny_dir, runs, "ddp", 2, "ddp", **bf16)
    fsdp = _gpu_train(data, tiny_dir, runs, "fsdp", 2, "fsdp", **bf16)
    a = load_file(ddp / "last" / "adapter_model.safetensors")
    b = load_file(fsdp / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        if "lora_B" in k:
            assert a[k].abs().sum() > 0, k
            cos = torch.nn.functional.cosine_similarity(a[k].flatten().float(), b[k].flatten().float(), dim=0)
            assert cos > 0.99, (k, float(cos))


def test_lora_bf16_mixed_trains_validates_and_predicts_on_gpu(tiny_dir, sample_data, tmp_path):
    """The default path on a GPU: bf16 weights, bf16-mixed, the fast path's scoped switches (bf16 LoRA inputs),
    validation by generation inside the loop, then prediction from the run folder."""
    from qwenvl_tune import api
    from qwenvl_tune.config import build_config

    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "model.dtype": "bfloat16", "train.precision": "bf16-mixed", "train.accelerator": "gpu",
        "train.max_steps": 4, "train.lr": 1e-3, "train.check_val_every_n_epoch": 1}))
    run = api.train(cfg)
    marker = (run / "best" / "COMPLETE").read_text()
    assert "val/json_valid" in marker  # validated inside the loop, under the training precision
    rows = api.predict(run, [sorted((sample_data / "valid").glob("*.jpg"))[0]])
    assert isinstance(rows[0]["output"], str)


def test_non_finite_step_is_skipped_on_the_device_and_named_before_anything_is_written(tiny_dir, sample_data,
                                                                                       tmp_path, monkeypatch):
    """On a GPU the loop reads each step's statistics one step late (no wait before the update): a NaN step is
    skipped by the fused optimizer on the device, and the run still stops naming it, with the checkpoint before it
    the newest one on disk."""
    import json

    from qwenvl_tune import api
    from qwenvl_tune.config import build_config
    from qwenvl_tune.data import collate as collate_mod
    from qwenvl_tune.rundir import MARKER, RunDir
    from qwenvl_tune.training.step import NonFiniteError

    real = collate_mod.collate
    calls = {"n": 0}

    def nan_collate(items, pad_id, left, **options):
        b = real(items, pad_id, left, **options)
        if calls["n"] == 4:
            b["pixel_values"] = torch.full_like(b["pixel_values"], float("nan"))
        calls["n"] += 1
        return b

    monkeypatch.setattr(collate_mod, "collate", nan_collate)
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "model.dtype": "bfloat16", "train.precision": "bf16-mixed", "train.accelerator": "gpu", "train.max_epochs": 3,
        "train.lr": 1e-3, "train.checkpoint_every_n_steps": 1, "train.check_val_every_n_epoch": 10,
        # the NaN batch is in the second epoch, where the image feature cache would keep the pixels out
        "train.image_cache_gib": 0}))
    with pytest.raises(NonFiniteError, match=r"global step 4"):
        api.train(cfg)
    ckpt = RunDir(tmp_path / "run").latest_resumable()
    assert json.loads((ckpt / MARKER).read_text())["global_step"] == 4


def test_frozen_vision_attention_with_liger_rotary_matches_the_library_tower(tiny_dir):
    """The swapped vision attention with Liger's rotary kernel gives the library tower's logits in bf16 (the rotary
    is computed in float32 either way and rounded once)."""
    pytest.importorskip("liger_kernel")
    from transformers import AutoModelForImageTextToText

    from qwenvl_tune.modeling.attention import enable_fast_vision_attention, swap_frozen_vision_attention

    inputs, _ = _two_sample_batch(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.bfloat16).cuda()
    enable_fast_vision_attention(model)
    with torch.no_grad():
        before = model(**inputs).logits.float()
        assert swap_frozen_vision_attention(model, rope="liger") > 0
        after = model(**inputs).logits.float()
    assert not torch.equal(before, torch.zeros_like(before))
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)


def test_fused_rms_norm_is_one_kernel_each_way_and_matches_the_library_on_gpu(tiny_dir):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForImageTextToText

    from qwenvl_tune.modeling import kernels as fk

    assert fk.native_rms_norm_available()
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.bfloat16).cuda()
    lib = next(m for m in model.modules() if type(m).__name__ in fk.RMS_NORM_CLASSES)
    fused = fk.FusedRMSNorm(lib)
    x = torch.randn(2, 300, lib.weight.numel(), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = lib(x)
        out = fused(x)  # warm-up
        with profile(activities=[ProfilerActivity.CUDA]) as fwd:
            out = fused(x)
            torch.cuda.synchronize()
    grad = torch.ones_like(out)
    with profile(activities=[ProfilerActivity.CUDA]) as bwd:
        out.backward(grad)
        torch.cuda.synchronize()
    kernels = lambda p: [e.name for e in p.events() if e.device_type == DeviceType.CUDA]  # noqa: E731
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=1e-2)
    assert len(kernels(fwd)) == 1, kernels(fwd)
    # the input's gradient in one kernel; the weight's (a parameter here) in at most two more
    assert len(kernels(bwd)) <= 3, kernels(bwd)


def test_image_feature_cache_on_gpu_keeps_pinned_host_copies_and_gives_the_same_loss(tiny_dir, sample_data, tmp_path):
    from qwenvl_tune.config import build_config
    from qwenvl_tune.data.check import check_split
    from qwenvl_tune.data.collate import RecordDataset, TrainCollator
    from qwenvl_tune.modeling.fastpath import FastPath
    from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training
    from qwenvl_tune.training.features import HostSlabs, ImageFeatureCache, cache_blocker
    from qwenvl_tune.training.setup import _encoder_and_vision
    from qwenvl_tune.training.step import TrainStep

    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{"model.dtype": "bfloat16",
                                                                                "lora.dropout": 0.0}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    model = prepare_for_training(load_base_model(cfg.model), cfg).cuda()
    fast = FastPath.resolve(cfg.model, model.config, autocast=True, cuda=True)
    assert cache_blocker(model, fast, 1.0) is None
    enc, vision = _encoder_and_vision(cfg, proc, fast)
    rows = RecordDataset(check_split(sample_data, "train").records, enc, "train")
    batch = TrainCollator(enc.pad_id, vision)([rows[0], rows[1]])
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
    step = TrainStep(model.train(), fast, ImageFeatureCache(model, 1.0))
    with fast.training(model), torch.autocast("cuda", dtype=torch.bfloat16):
        first = step(batch)
        first.backward()
        second = step(batch)
        second.backward()
    assert step.features.misses == 2 and step.features.hits == 2
    assert all(t.is_pinned() and not t.is_cuda for t in step.features.kept.values())
    assert step.features.bytes == HostSlabs.SLAB, "both documents in one page-locked slab"
    assert torch.equal(first.detach(), second.detach())


def test_compiled_decoder_layers_match_eager_with_inductor_and_repeat_exactly(tiny_dir, sample_data, tmp_path):
    """Inductor's kernels for the decoder layers (``model.compile``, on by default on a GPU): the eager loss and
    LoRA gradients within bf16 rounding, one compile for every later length, and the same numbers again from the
    same random state (LoRA dropout drawn by Inductor's generator), which exact resume relies on."""
    from torch._dynamo.utils import counters

    from qwenvl_tune.config import build_config
    from qwenvl_tune.data.check import check_split
    from qwenvl_tune.data.collate import RecordDataset, TrainCollator
    from qwenvl_tune.modeling.fastpath import FastPath
    from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training
    from qwenvl_tune.training.setup import _encoder_and_vision
    from qwenvl_tune.training.step import TrainStep

    torch._dynamo.reset()
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "model.dtype": "bfloat16", "lora.target_modules": "all-linear", "train.image_cache_gib": 0}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(cfg.model), cfg).cuda().train()
    fast = FastPath.resolve(cfg.model, model.config, autocast=True, cuda=True)
    assert fast.compile_layers
    enc, vision = _encoder_and_vision(cfg, proc, fast)
    rows = RecordDataset(check_split(sample_data, "train").records, enc, "train")
    collate = TrainCollator(enc.pad_id, vision)
    eager, compiled = TrainStep(model, fast.replace(compile_layers=False)), TrainStep(model, fast)

    def run(step, batch, seed=1):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with fast.training(model), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(batch)
        loss.backward()
        return float(loss), torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters())
                                       if p.grad is not None])

    graphs = []
    for i in range(0, 6, 2):
        batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in collate([rows[i], rows[i + 1]]).items()}
        (le, ge), (lc, gc) = run(eager, batch), run(compiled, batch)
        graphs.append(counters["stats"]["unique_graphs"])
        assert abs(le - lc) / le < 1e-2, (le, lc)
        assert ge.abs().sum() > 0 and F.cosine_similarity(ge, gc, dim=0) > 0.99
        again = run(compiled, batch)
        assert again[0] == lc and torch.equal(again[1], gc), "the same random state gives the same step"
    assert graphs[0] > 0 and graphs[2] == graphs[1], graphs


def test_4bit_weights_unpack_like_bitsandbytes_cuda_kernel_and_the_inductor_product_matches(tiny_dir):
    """QLoRA's products inside compiled layers (``modeling/nf4.py``): on the GPU, the tensor-operation unpacking
    equals bitsandbytes' CUDA dequantisation bit for bit, eagerly; under Inductor (one generated kernel, where
    a multiply-add may fuse) the weight and the product stay within a bf16 rounding of bitsandbytes' layer."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bf

    from qwenvl_tune.modeling import nf4

    torch.manual_seed(0)
    for nested in (True, False):
        layer = bnb.nn.Linear4bit(2048, 11008, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=nested, quant_storage=torch.bfloat16)
        layer.weight = bnb.nn.Params4bit(torch.randn(11008, 2048) * 0.02, requires_grad=False, quant_type="nf4",
                                         compress_statistics=nested, quant_storage=torch.bfloat16)
        layer = layer.cuda()
        layer.bias = torch.nn.Parameter(torch.randn(11008, device="cuda", dtype=torch.bfloat16), requires_grad=False)
        want_w = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(nf4.dequantize(layer.weight), want_w)
        compiled_w = torch.compile(nf4.dequantize)(layer.weight)
        assert (compiled_w.float() - want_w.float()).abs().max() <= want_w.float().abs().max() * 2 ** -8

        x = torch.randn(2, 700, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        want = layer(x)
        want.float().pow(2).mean().backward()
        want_grad, x.grad = x.grad.clone(), None
        nf4.make_compilable(torch.nn.Sequential(layer))
        torch._dynamo.reset()
        got = torch.compile(layer)(x)
        got.float().pow(2).mean().backward()
        for a, b in ((got, want), (x.grad, want_grad)):
            assert (a.float() - b.float()).norm() / b.float().norm() < 4e-3
