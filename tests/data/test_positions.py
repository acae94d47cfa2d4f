"""Rope position ids computed by the data loader equal the model's own, for every supported family."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from qwenvl_tune.config import build_config
from qwenvl_tune.data.collate import Encoder, collate
from qwenvl_tune.modeling.generate import MODEL_INPUTS
from qwenvl_tune.modeling.loss import answer_only_loss
from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training
from qwenvl_tune.data.positions import VisionIndex, image_token_id, mrope_positions
from qwenvl_tune.modeling.positions import PositionCheck, model_rope_index

PIXELS = 64 * 28 * 28


def _batch(proc, pages: int = 1, **collate_options):
    enc = Encoder(proc)
    # pages of different shapes (wide, tall, square grids) and answers of different lengths: right padding
    sizes = [(300, 420), (560, 280), (336, 336)]
    rng = np.random.default_rng(0)  # noise, not flat colour: patches must differ for positions to matter
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    # with several pages, sample i reads pages i, i+1, ...: each document mixes grid shapes
    docs = [[images[(i + k) % 3] for k in range(pages)] for i in range(3)]
    items = [enc.encode_train(doc, "extract", f'{{"n": "{i}"}}' * (2 * i + 1)) for i, doc in enumerate(docs)]
    return collate(items, enc.pad_id, left=False, **collate_options)


@pytest.mark.parametrize("pages", [1, 2, 3])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_loader_positions_equal_the_models_rope_index(family, pages, tiny_family):
    ckpt = tiny_family(family)
    proc = load_processor(ckpt, PIXELS, PIXELS * 4)
    batch = _batch(proc, pages)
    assert len(batch["image_grid_thw"]) == 3 * pages
    model = load_base_model(build_config(None, {"model.name_or_path": str(ckpt), "model.dtype": "float32"}).model)
    theirs = model_rope_index(model, batch)
    mask = batch["attention_mask"].bool()
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 3  # three different grids
    assert torch.equal(batch["position_ids"][:, mask], theirs[:, mask])


def test_several_images_in_one_sequence(tiny_dir):
    proc = load_processor(tiny_dir, PIXELS, PIXELS * 4)
    img = image_token_id(proc)
    grids = torch.tensor([[1, 4, 6], [1, 8, 2]])
    ids = torch.cat([torch.tensor([5, 6, 7]), torch.full((6,), img), torch.tensor([8, 9]), torch.full((4,), img),
                     torch.tensor([10])])
    got = mrope_positions(ids, grids, img, 2)
    # text 0-2; image 1 (2x3 merged) from 3; text resumes at 3+3; image 2 (4x1) from 8; text at 8+4
    assert got[:, :3].tolist() == [[0, 1, 2]] * 3
    assert got[:, 3:9].tolist() == [[3] * 6, [3, 3, 3, 4, 4, 4], [3, 4, 5, 3, 4, 5]]
    assert got[:, 9:11].tolist() == [[6, 7]] * 3
    assert got[:, 11:15].tolist() == [[8] * 4, [8, 9, 10, 11], [8] * 4]
    assert got[:, 15].tolist() == [12] * 3
    with pytest.raises(ValueError, match="needs 6 tokens, the sample has 5"):
        mrope_positions(torch.cat([ids[:3], ids[4:]]), grids, img, 2)  # one image token short


def test_training_loss_is_the_same_with_loader_positions(tiny_dir, tmp_path):
    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{"data.min_pixels": PIXELS,
                                                                             "data.max_pixels": PIXELS * 4}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    batch = _batch(proc)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    own = answer_only_loss(model, inputs, batch["labels"])
    calls = []
    owner = next(m for m in model.modules() if callable(getattr(m, "get_rope_index", None)))
    real = owner.get_rope_index
    owner.get_rope_index = lambda *a, **k: calls.append(1) or real(*a, **k)
    loaded = answer_only_loss(model, {**inputs, "position_ids": batch["position_ids"]}, batch["labels"])
    assert torch.allclose(own, loaded, rtol=1e-6, atol=0)
    assert calls == []  # with the loader's ids the model does not compute its own


def test_position_check_falls_back_when_the_model_disagrees(tiny_dir):
    proc = load_processor(tiny_dir, PIXELS, PIXELS * 4)
    model = load_base_model(build_config(None, {"model.name_or_path": str(tiny_dir), "model.dtype": "float32"}).model)
    batch = _batch(proc)
    assert PositionCheck().usable(model, batch)
    wrong = dict(batch, position_ids=batch["position_ids"] + 1)
    check = PositionCheck()
    with pytest.warns(UserWarning, match="differ from this transformers release"):
        assert not check.usable(model, wrong)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once: no second comparison, no second warning
        assert not check.usable(model, wrong)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_loader_vision_index_gives_the_same_loss_and_gradients(family, tiny_family, tmp_path):
    ckpt = tiny_family(family)
    cfg = build_config(None, tiny_overrides(tmp_path, ckpt, tmp_path, **{"data.min_pixels": PIXELS,
                                                                         "data.max_pixels": PIXELS * 4}))
    proc = load_processor(ckpt, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    vision = VisionIndex.for_config(model.config)
    assert vision is not None and (vision.window_size is not None) == (family == "qwen2_5_vl")
    batch = _batch(proc)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    inputs["position_ids"] = batch["position_ids"]
    index = vision(batch["image_grid_thw"])
    assert all(k.startswith("image_") for k in index)

    def loss_and_grads(extra):
        model.zero_grad()
        torch.manual_seed(1)  # the same LoRA dropout masks
        loss = answer_only_loss(model, {**inputs, **extra}, batch["labels"], batch["answer_positions"])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    own_loss, own_grads = loss_and_grads({})
    loss, grads = loss_and_grads(index)
    assert torch.allclose(own_loss, loss, rtol=1e-6, atol=0)
    assert len(grads) == len(own_grads) > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(own_grads, grads))
    # the tower does read them: wrong indices give other image features
    key = "image_window_index" if family == "qwen2_5_vl" else "image_position_ids"
    with torch.no_grad():
        def features(extra):
            out = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], **extra)
            return torch.cat(list(getattr(out, "pooler_output", out)))
        right, wrong = features(index), features({**index, key: index[key].flip(0)})
    same, moved = (features({}) - right).abs().max(), (wrong - right).abs().max()
    assert same == 0 < moved  # the same arithmetic on the same values; moved positions change it


def test_answer_positions_are_where_the_next_token_is_supervised(tiny_dir):
    batch = _batch(load_processor(tiny_dir, PIXELS, PIXELS * 4))
    labels = batch["labels"]
    for i in range(labels.shape[1] - 1):
        assert (i in batch["answer_positions"].tolist()) == bool((labels[:, i + 1] != -100).any())


def test_vision_index_only_for_families_whose_tower_reads_it(tiny_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    assert VisionIndex.for_config(config) is not None
    config.model_type = "llava"
    assert VisionIndex.for_config(config) is None


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_training_step_inputs_give_the_plain_loss_and_gradients(family, tiny_family, tmp_path):
    """What the trainer's fast path feeds the model (loader positions, vision indices and answer
    positions; no padding mask; lengths padded to a multiple of 64) against the plain model call on
    the unrounded batch."""
    from qwenvl_tune.training.step import TrainStep

    ckpt = tiny_family(family)
    cfg = build_config(None, tiny_overrides(tmp_path, ckpt, tmp_path, **{
        "data.min_pixels": PIXELS, "data.max_pixels": PIXELS * 4, "lora.dropout": 0.0}))
    proc = load_processor(ckpt, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    plain_batch = _batch(proc)
    inputs = {k: plain_batch[k] for k in MODEL_INPUTS if k in plain_batch}
    plain = model(**inputs, labels=plain_batch["labels"]).loss
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    batch = _batch(proc, vision=VisionIndex.for_config(model.config), pad_to_multiple_of=64)
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["input_ids"].shape[1] > plain_batch["input_ids"].shape[1]
    seen = {}
    forward = model.forward
    model.forward = lambda **kw: seen.update(kw) or forward(**kw)
    loss = TrainStep(model, fast=True)(batch)
    assert "attention_mask" not in seen and "position_ids" in seen and "image_cu_seqlens" in seen
    assert ("image_window_index" in seen) == (family == "qwen2_5_vl")
    assert torch.allclose(plain, loss, rtol=1e-5, atol=0), (plain, loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == plain_grads.keys() and grads
    for n in grads:
        assert torch.allclose(grads[n], plain_grads[n], rtol=1e-4, atol=1e-6), n
