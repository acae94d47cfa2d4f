"""The fast training path computes the plain path's loss and gradients."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AttentionInterface

from conftest import tiny_overrides
from qwenvl_tune.config import build_config
from qwenvl_tune.data.collate import Encoder, collate
from qwenvl_tune.inference.generate import MODEL_INPUTS
from qwenvl_tune.modeling import fast
from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training


def _batch(proc):
    enc = Encoder(proc)
    items = [enc.encode_train(Image.new("RGB", (300 + 60 * i, 400), (40 * i, 90, 20)), "extract", f'{{"n": "{i}" }}' * (i + 1))
             for i in range(3)]
    return collate(items, enc.pad_id, left=False)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_path_matches_plain_loss_and_grads(tiny_dir, tmp_path, method):
    results = {}
    calls = []
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
                return fast.varlen_attention_forward(*a, **k)
            AttentionInterface.register(fast.VARLEN_ATTENTION, counting)
        batch = _batch(proc)
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if fast_path:
            loss = fast.answer_only_loss(model, inputs, batch["labels"])
        else:
            loss = model(**inputs, labels=batch["labels"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fast_path] = (loss.detach(), grads)
    fast.register()
    (l0, g0), (l1, g1) = results[False], results[True]
    assert torch.allclose(l0, l1, rtol=1e-5), (l0, l1)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n
    # the vision tower called the varlen function once per layer with the window boundaries
    assert calls and all(calls) and len(calls) == 2  # tiny vision tower: 2 blocks, one call each


@pytest.mark.parametrize("chunk", [fast.LOSS_CHUNK, 7])
def test_answer_only_loss_uses_few_logits(tiny_dir, tmp_path, monkeypatch, chunk):
    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{"lora.dropout": 0.0}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    batch = _batch(proc)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    whole = fast.answer_only_loss(model, inputs, batch["labels"], chunked=False)
    whole.backward()
    whole_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(fast, "LOSS_CHUNK", chunk)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[:-1].numel()))
    loss = fast.answer_only_loss(model, inputs, batch["labels"])
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
