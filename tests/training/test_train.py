"""Training on tiny random-init checkpoints, on CPU: what changes, what must not, and the run-folder contract."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import swatch, tiny_overrides, write_split
from qwenvl_tune import api
from qwenvl_tune.config import build_config
from qwenvl_tune.data.check import check_split
from qwenvl_tune.data.collate import Encoder, RecordDataset, TrainCollator
from qwenvl_tune.inference.session import Predictor
from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training
from qwenvl_tune.training.step import TrainStep, warmup_linear_decay


def test_lora_trains_adapters_only_and_loss_falls(tiny_dir, sample_data, tmp_path):
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{"train.lr": 5e-3}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    model = prepare_for_training(load_base_model(cfg.model), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = check_split(sample_data, "train").records[:2]
    loader = DataLoader(RecordDataset(records, Encoder(proc)), batch_size=2, collate_fn=TrainCollator(Encoder(proc).pad_id))
    step = TrainStep(model.train(), cfg.model.fast_path)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(12):
        for batch in loader:
            loss = step(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert lora and changed == {n for n in lora if "lora_B" in n or "lora_A" in n}
    # only language-model attention q/v projections carry adapters; the vision tower has none
    assert all(".q_proj." in n or ".v_proj." in n for n in lora)
    assert not any("visual" in n for n in lora)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def test_warmup_then_linear_decay():
    f = warmup_linear_decay(4, 12)
    assert [round(f(s), 3) for s in range(13)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]


def _memorise_data(tmp_path):
    targets = [{"route": "O385-YZ-713", "dock": "D29"}, {"route": "T147-EH-365", "dock": "D21"}]
    rows = [{"image": f"{i}.png", "prefix": "extract data in JSON format", "suffix": t} for i, t in enumerate(targets)]
    imgs = {"0.png": swatch((230, 40, 40), text="O385"), "1.png": swatch((40, 40, 230), text="T147")}
    for split in ("train", "valid"):
        write_split(tmp_path / "mem" / split, rows, imgs)
    return tmp_path / "mem", targets


def test_full_finetune_memorises_two_samples_and_predict_reproduces_them(tiny_dir, tmp_path):
    data, targets = _memorise_data(tmp_path)
    cfg = build_config(None, tiny_overrides(data, tiny_dir, tmp_path / "runs", **{
        "model.method": "full", "train.lr": 3e-3, "train.max_epochs": 80, "train.check_val_every_n_epoch": 40,
        "train.warmup_steps": 5}))
    run = api.train(cfg)
    for name in ("config.yaml", "best/COMPLETE", "last/COMPLETE", "logs/metrics.csv", "data_summary.json"):
        assert (run / name).exists(), name
    assert len(list((run / "checkpoints").iterdir())) == cfg.train.keep_checkpoints
    # predict needs nothing but the run folder
    rows = api.predict(run, [data / "valid" / "0.png", data / "valid" / "1.png"])
    for row, gold in zip(rows, targets):
        assert row["valid"], row
        assert row["json"] == gold
        assert row["output"] == json.dumps(gold, ensure_ascii=False)
    res = api.evaluate(run, "valid")
    assert res["finetuned"]["edit_distance"] == 0.0 and res["finetuned"]["exact_match"] == 1.0
    assert (run / "eval" / "valid" / "predictions.jsonl").read_text().count("\n") == 2


def test_adapter_loads_with_plain_peft_and_gives_identical_logits(tiny_dir, sample_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "train.max_steps": 3, "train.lr": 1e-2, "lora.target_modules": "all-linear"}))
    run = api.train(cfg)
    p = Predictor.from_run(run, "best", device="cpu")
    ours, proc = p.model, p.processor
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), run / "best").eval()
    rec = check_split(sample_data, "valid").records[0]
    item = RecordDataset([rec], Encoder(proc))[0]
    batch = {k: v.unsqueeze(0) if k in ("input_ids",) else v for k, v in item.items() if k in ("input_ids", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        a, b = ours(**batch).logits, plain(**batch).logits
        base = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()(**batch).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-3), "the adapter should have changed the model"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_families_train_and_predict(family, tiny_family, sample_data, tmp_path):
    ckpt = tiny_family(family)
    px = 16 * 32 * 32 if family == "qwen3_vl" else 16 * 28 * 28
    cfg = build_config(None, tiny_overrides(sample_data, ckpt, tmp_path, **{
        "train.max_steps": 2, "data.min_pixels": px, "data.max_pixels": px, "generate.max_new_tokens": 8}))
    run = api.train(cfg)
    rows = api.predict(run, [sorted((sample_data / "valid").glob("*.jpg"))[0]])
    assert "output" in rows[0] and isinstance(rows[0]["output"], str)


@pytest.mark.parametrize("ending", ["max_steps mid-epoch", "last epoch not a validation epoch"])
def test_final_weights_are_validated_inside_fit(ending, tiny_dir, sample_data, tmp_path, monkeypatch):
    # sample_data has 6 training rows: 3 steps per epoch at batch 2
    extra = ({"train.max_steps": 2, "train.check_val_every_n_epoch": 5} if ending.startswith("max_steps")
             else {"train.max_epochs": 3, "train.check_val_every_n_epoch": 2})
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **extra))
    run = api.train(cfg)
    import csv

    rows = [r for f in run.glob("logs/**/metrics.csv") for r in csv.DictReader(open(f))]
    val_steps = sorted({int(r["step"]) for r in rows if r.get("val/field_f1")})
    train_steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert val_steps and val_steps[-1] >= train_steps[-1]


@pytest.mark.parametrize("cuda, accelerator, pinned", [(True, "auto", True), (True, "cpu", False), (False, "auto", False)])
def test_training_batches_are_pinned_for_a_gpu(cuda, accelerator, pinned, tiny_dir, sample_data, tmp_path, monkeypatch):
    """Page-locked training batches when they go to a GPU (the copy then does not block the process)."""
    from qwenvl_tune.data.check import check_split as check
    from qwenvl_tune.training import setup

    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{"train.accelerator": accelerator}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    train_loader, val_loader = setup.setup_loaders(cfg, proc, check(sample_data, "train"), check(sample_data, "valid"))
    assert train_loader.pin_memory is pinned
    assert train_loader.collate_fn.vision is not None  # the fast path's loader-side vision indices


def test_best_ties_are_broken_by_validity_then_tree_accuracy_then_edit_distance_then_later_weights():
    from qwenvl_tune.training.best import ranking_key, tie_reason

    base = {"field_f1": 0.0, "json_valid": 0.5, "ted_accuracy": 0.2, "edit_distance": 0.4}
    key = ranking_key(base, "val/field_f1", "max")
    assert ranking_key({**base, "json_valid": 0.6}, "val/field_f1", "max") > key
    assert ranking_key({**base, "ted_accuracy": 0.3}, "val/field_f1", "max") > key
    assert ranking_key({**base, "edit_distance": 0.3}, "val/field_f1", "max") > key  # smaller is better
    assert ranking_key({**base, "field_f1": 0.1, "json_valid": 0.0}, "val/field_f1", "max") > key  # the metric first
    assert tie_reason(ranking_key({**base, "edit_distance": 0.3}, "val/field_f1", "max"), key) == "better edit_distance"
    assert tie_reason(key, key).endswith("the later weights")
    assert ranking_key({**base, "edit_distance": 0.3}, "val/edit_distance", "min")[0] == -0.3


def test_valid_fraction_holds_out_training_documents_that_evaluate_and_resume_keep(sample_data, tiny_dir, tmp_path,
                                                                                  capsys):
    import shutil

    from qwenvl_tune.rundir import RunDir, checkpoint_meta

    data = tmp_path / "OnlyTrain"
    shutil.copytree(sample_data / "train", data / "train")
    over = {"data.valid_fraction": 0.34, "train.max_epochs": 1, "generate.max_new_tokens": 4}
    run = api.train(build_config(None, tiny_overrides(data, tiny_dir, tmp_path, **over)))
    held = RunDir(run).holdout()
    assert len(held) == 2 and set(held) <= {f"train:{i}" for i in range(1, 7)}  # round(0.34 x 6)
    out = capsys.readouterr().out
    assert "data valid: 2 training documents held out to validate on (data.valid_fraction 0.34" in out
    assert checkpoint_meta(RunDir(run).latest_resumable())["data"].startswith("4 documents")  # trained on the rest
    metrics = api.evaluate(run, "valid", which="last")
    assert metrics["n"] == 2 and not metrics.get("problems")
    scored = [json.loads(line)["id"] for line in (run / "eval" / "valid-last" / "predictions.jsonl").open()]
    assert sorted(scored) == sorted(held)
    # the same seed draws the same documents, and a resume validates on the run's own
    again = api.train(build_config(None, tiny_overrides(data, tiny_dir, tmp_path, **{**over, "run.name": "again"})))
    assert RunDir(again).holdout() == held
    api.train(build_config(None, tiny_overrides(data, tiny_dir, tmp_path, **{**over, "train.max_epochs": 2})),
              resume=str(run))
    assert RunDir(run).holdout() == held
    assert checkpoint_meta(RunDir(run).latest_resumable())["global_step"] == 4  # 2 steps an epoch on 4 documents


def test_valid_fraction_needs_no_holdout_when_the_data_has_a_valid_split(sample_data, tiny_dir, tmp_path, capsys):
    from qwenvl_tune.rundir import RunDir

    over = {"data.valid_fraction": 0.5, "train.max_steps": 1, "generate.max_new_tokens": 4}
    run = api.train(build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **over)))
    assert RunDir(run).holdout() is None
    assert "data.valid_fraction 0.5 not used: the data has a valid split" in capsys.readouterr().out
    with pytest.raises(Exception, match="valid_fraction is a share"):
        build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{"data.valid_fraction": 1.0})).validate()


def test_train_warns_when_answers_are_longer_than_generation_allows(sample_data, tiny_dir, tmp_path, capsys):
    import re

    over = {"train.max_steps": 1, "generate.max_new_tokens": 8, "train.check_val_every_n_epoch": 10}
    api.train(build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **over)))
    found = re.search(r"warning: the longest train answer is (\d+) tokens, the longest valid answer is (\d+) tokens, "
                      r"more than generate.max_new_tokens \(8\).*--generate.max_new_tokens (\d+) or more",
                      capsys.readouterr().out)
    assert found and int(found[3]) > max(int(found[1]), int(found[2])) > 8
    api.train(build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        **over, "generate.max_new_tokens": int(found[3]), "run.name": "enough"})))
    assert "longest train answer" not in capsys.readouterr().out
