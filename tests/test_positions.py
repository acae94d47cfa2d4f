"""Rope position ids computed by the data loader equal the model's own, for every supported family."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from qwenvl_tune.config import build_config
from qwenvl_tune.data.collate import Encoder, collate
from qwenvl_tune.inference.generate import MODEL_INPUTS
from qwenvl_tune.modeling.fast import answer_only_loss
from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training
from qwenvl_tune.modeling.positions import PositionCheck, image_token_id, model_rope_index, mrope_positions

PIXELS = 64 * 28 * 28


def _batch(proc):
    enc = Encoder(proc)
    # pages of different shapes (wide, tall, square grids) and answers of different lengths: right padding
    sizes = [(300, 420), (560, 280), (336, 336)]
    items = [enc.encode_train(Image.new("RGB", size, (40 * i, 90, 20)), "extract", f'{{"n": "{i}"}}' * (2 * i + 1))
             for i, size in enumerate(sizes)]
    return collate(items, enc.pad_id, left=False)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_loader_positions_equal_the_models_rope_index(family, tiny_family):
    ckpt = tiny_family(family)
    proc = load_processor(ckpt, PIXELS, PIXELS * 4)
    batch = _batch(proc)
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
