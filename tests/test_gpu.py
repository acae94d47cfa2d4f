"""GPU-only checks, run on the GPU machine with `make test-gpu` (skipped on CPU, with the reason)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_varlen_vision_attention_matches_per_window_sdpa():
    from qwenvl_tune.modeling.fast import varlen_attention_forward

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


def test_fast_path_matches_plain_on_gpu(tiny_dir, tmp_path):
    from PIL import Image

    from qwenvl_tune.data.collate import Encoder, collate
    from qwenvl_tune.modeling.fast import answer_only_loss, enable_fast_vision_attention
    from qwenvl_tune.modeling.load import load_processor
    from transformers import AutoModelForImageTextToText

    proc = load_processor(tiny_dir, 64 * 28 * 28, 64 * 28 * 28)
    enc = Encoder(proc)
    batch = collate([enc.encode_train(Image.new("RGB", (300, 400), (i * 80, 30, 30)), "x", '{"a": "%d"}' % i)
                     for i in range(2)], enc.pad_id, left=False)
    inputs = {k: batch[k].cuda() for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.bfloat16).cuda()
    plain = model(**inputs, labels=batch["labels"].cuda()).loss
    enable_fast_vision_attention(model)
    fast = answer_only_loss(model, inputs, batch["labels"].cuda())
    assert abs(float(plain) - float(fast)) / float(plain) < 1e-2
