"""The image feature cache: later epochs take the frozen tower's kept output instead of running it, and compute
exactly what running it computes."""

from __future__ import annotations

import pytest
import torch

from conftest import step_loss_and_grads as _loss_and_grads, tiny_overrides
from qwenvl_tune import api
from qwenvl_tune.config import build_config
from qwenvl_tune.data.check import check_split
from qwenvl_tune.data.collate import RecordDataset, TrainCollator
from qwenvl_tune.modeling.align import vision_tower
from qwenvl_tune.modeling.fastpath import FastPath
from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training
from qwenvl_tune.training.features import ImageFeatureCache, cache_blocker
from qwenvl_tune.training.setup import _encoder_and_vision
from qwenvl_tune.training.step import TrainStep


@pytest.fixture(scope="module")
def two_page_data(tmp_path_factory):
    from qwenvl_tune.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("mp") / "D", n_train=4, n_valid=1, n_test=0, seed=5,
                         size=(280, 364), multipage=0.5)


def _step_and_batches(data, tiny_dir, tmp_path, gib=1.0):
    cfg = build_config(None, tiny_overrides(data, tiny_dir, tmp_path, **{"train.image_cache_gib": gib}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    fast = FastPath.resolve(cfg.model, model.config, cuda=False)
    assert cache_blocker(model, fast, gib) is None
    enc, vision = _encoder_and_vision(cfg, proc, fast)
    rows = RecordDataset(check_split(data, "train").records, enc, "train")
    collate = TrainCollator(enc.pad_id, vision)
    return TrainStep(model.train(), fast, ImageFeatureCache(model, gib)), rows, collate


def test_kept_features_give_the_same_loss_and_gradients_bit_for_bit(two_page_data, tiny_dir, tmp_path):
    step, rows, collate = _step_and_batches(two_page_data, tiny_dir, tmp_path)
    batch = collate([rows[0], rows[1], rows[2]])
    assert batch["page_counts"] != [1, 1, 1], "a two-page document in the batch"
    first = _loss_and_grads(step, batch)  # runs the tower, keeps its output per document
    assert set(step.features.kept) == {0, 1, 2} and step.features.misses == 3
    tokens = {r: t.shape[0] for r, t in step.features.kept.items()}
    assert tokens == {i: int((batch["input_ids"][i] == step.model.config.image_token_id).sum()) for i in range(3)}

    calls = []
    handle = vision_tower(step.model).register_forward_hook(lambda *a: calls.append(1))
    second = _loss_and_grads(step, batch)  # takes the kept features: the tower does not run
    handle.remove()
    assert not calls and step.features.hits == 3
    assert torch.equal(first[0], second[0])
    assert first[1].keys() == second[1].keys() and first[1]
    assert all(torch.equal(first[1][n], second[1][n]) for n in first[1])

    # a batch with a document not kept runs the tower for the whole batch, and keeps the new one
    mixed = collate([rows[3], rows[0]])
    _loss_and_grads(step, mixed)
    assert 3 in step.features.kept and step.features.misses == 5

    # and the kept features equal a fresh step's, without any cache
    plain = TrainStep(step.model, step.fast, None)
    assert torch.equal(_loss_and_grads(plain, batch)[0], first[0])


def test_a_full_cache_keeps_what_fits_says_so_once_and_stays_correct(two_page_data, tiny_dir, tmp_path, capsys):
    step, rows, collate = _step_and_batches(two_page_data, tiny_dir, tmp_path)
    one = collate([rows[0]])
    _loss_and_grads(step, one)
    size = step.features.used
    step, rows, collate = _step_and_batches(two_page_data, tiny_dir, tmp_path, gib=(size + 1) / 2**30)  # room for document 0 only
    batch = collate([rows[0], rows[1]])
    a = _loss_and_grads(step, batch)
    assert len(step.features.kept) == 1 and step.features.full
    b = _loss_and_grads(step, batch)  # one of two kept: the tower runs for both
    assert step.features.hits == 0 and torch.equal(a[0], b[0])
    out = capsys.readouterr().out
    assert out.count("image feature cache full") == 1 and "1 documents kept" in out
    assert step.features.bytes <= step.features.budget


def test_host_slabs_hold_documents_back_to_back_within_the_budget():
    from qwenvl_tune.training.features import HostSlabs

    slabs = HostSlabs(budget=3 * HostSlabs.SLAB, pin=False, slab=HostSlabs.SLAB)
    docs = [torch.randn(1000 + 37 * i, 64, dtype=torch.bfloat16) for i in range(40)]  # 128-133 KiB each
    kept = []
    for d in docs:
        host = slabs.take(d.shape, d.dtype)
        host.copy_(d)
        kept.append(host)
    assert slabs.held == HostSlabs.SLAB, "forty documents share one slab"
    assert slabs.used == sum(d.numel() * 2 for d in docs)
    assert all((h.data_ptr() - h.untyped_storage().data_ptr()) % HostSlabs.ALIGN == 0 for h in kept)
    assert all(torch.equal(h, d) for h, d in zip(kept, docs)), "no document overwrote another"

    big = torch.ones(HostSlabs.SLAB - 2**20, dtype=torch.uint8)  # does not fit what is left of the first slab
    host = slabs.take(big.shape, big.dtype)
    assert host is not None and slabs.held == 2 * HostSlabs.SLAB
    # the budget has one slab's room left: a document larger than that is refused, a smaller one still placed
    assert slabs.take(torch.Size([HostSlabs.SLAB + 1]), torch.uint8) is None
    assert slabs.take(torch.Size([HostSlabs.SLAB - 1]), torch.uint8) is not None
    assert slabs.held == 3 * HostSlabs.SLAB == slabs.budget
    assert slabs.take(torch.Size([HostSlabs.SLAB]), torch.uint8) is None
    assert all(torch.equal(h, d) for h, d in zip(kept, docs))


def test_page_locked_slabs_are_powers_of_two_so_the_budget_bounds_what_is_pinned():
    """PyTorch's page-locked allocator rounds each request up to a power of two (CachingHostAllocator): the slabs
    asked for are powers of two, never above the budget."""
    from qwenvl_tune.training.features import HostSlabs

    mib = 2**20
    pinned = HostSlabs(budget=100 * mib, pin=True)
    assert pinned._new_slab_size(5 * mib) == 64 * mib
    assert pinned._new_slab_size(70 * mib) == 0, "128 MiB would pass the budget; 64 MiB is too small"
    pinned.held = 64 * mib  # 36 MiB left: the largest power of two within it
    assert pinned._new_slab_size(5 * mib) == 32 * mib
    assert pinned._new_slab_size(33 * mib) == 0
    large = HostSlabs(budget=8 * 2**30, pin=True)
    assert large._new_slab_size(65 * mib) == 128 * mib
    plain = HostSlabs(budget=100 * mib, pin=False, slab=64 * mib)  # not page-locked: sizes not rounded
    plain.held = 64 * mib
    assert plain._new_slab_size(5 * mib) == 36 * mib
    cpu = HostSlabs(budget=100 * mib, pin=False)  # features on a CPU: memory per document, as it is
    assert cpu._new_slab_size(5 * mib) == 5 * mib


def test_the_cache_is_off_where_the_features_would_not_be_the_same(tiny_family, tiny_dir, tmp_path):
    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path))
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    fast = FastPath.resolve(cfg.model, model.config, cuda=False)
    assert cache_blocker(model, fast, 8.0) is None
    assert cache_blocker(model, fast, 0) == "train.image_cache_gib=0"
    assert cache_blocker(model, fast, 8.0, fsdp=True) == "FSDP"
    assert "fast path" in cache_blocker(model, FastPath.off(), 8.0)
    for extra in ({"model.method": "full"}, {"lora.target_modules": "all-linear"}):  # adapters in the tower too
        trained = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{"model.train_vision": True, **extra}))
        assert "trained" in cache_blocker(prepare_for_training(load_base_model(trained.model), trained), fast, 8.0)
    q3 = build_config(None, tiny_overrides(tmp_path, tiny_family("qwen3_vl"), tmp_path))
    assert "feeds more than the image tokens" in cache_blocker(load_base_model(q3.model), fast, 8.0)


def test_training_with_the_cache_ends_with_the_weights_of_training_without(two_page_data, tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    kw = {"train.max_epochs": 3, "train.check_val_every_n_epoch": 10, "train.lr": 5e-3,
          "generate.max_new_tokens": 4}
    on = api.train(build_config(None, tiny_overrides(two_page_data, tiny_dir, tmp_path, **{**kw, "run.name": "on"})))
    said = capsys.readouterr().out
    off = api.train(build_config(None, tiny_overrides(two_page_data, tiny_dir, tmp_path, **{
        **kw, "run.name": "off", "train.image_cache_gib": 0})))
    assert "image feature cache: up to " in said and "4 documents" in said and "took kept features" in said
    # epochs 2 and 3 take kept features for all 4 documents, and the loader made those batches without pixels
    assert "8 document-steps took kept features (8 of them loaded without preparing pixels), 4 ran the tower" in said
    assert "image feature cache: off (train.image_cache_gib=0)" in capsys.readouterr().out
    a = load_file(on / "last" / "adapter_model.safetensors")
    b = load_file(off / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # with loader worker processes: they read the kept flags from shared memory (batches they made ahead of a
    # flag still carry pixels, which the step ignores)
    workers = api.train(build_config(None, tiny_overrides(two_page_data, tiny_dir, tmp_path, **{
        **kw, "run.name": "workers", "data.num_workers": 2})))
    said = capsys.readouterr().out
    pixel_free = int(said.split(" of them loaded without preparing pixels")[0].rsplit("(", 1)[1])
    assert 0 < pixel_free <= 8, said
    c = load_file(workers / "last" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_the_default_budget_is_capped_at_a_quarter_of_the_machine_s_memory(tiny_dir, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from qwenvl_tune.training import run as run_mod

    cfg = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path))
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    fast = FastPath.resolve(cfg.model, model.config, cuda=False)
    fabric = SimpleNamespace(world_size=2, is_global_zero=True, strategy=None)
    monkeypatch.setattr(run_mod, "fabric_is_fsdp", lambda f: False)
    monkeypatch.setattr(run_mod, "host_memory_gib", lambda: 16.0)
    cache = run_mod._feature_cache(model, cfg, fast, fabric)
    assert cache.budget == 2 * 2**30  # 16 GiB / 4 / 2 processes
    assert "up to 2 GiB of host memory per process (a quarter" in capsys.readouterr().out
    explicit = build_config(None, tiny_overrides(tmp_path, tiny_dir, tmp_path, **{"train.image_cache_gib": 12}))
    assert run_mod._feature_cache(model, explicit, fast, fabric).budget == 12 * 2**30  # asked for: as asked
