"""Shared fixtures: tiny checkpoints and sample data, built once per test session, never downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
# for tests that run the CLI in a subprocess: this checkout's package, one thread per process
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from qwenvl_tune.modeling.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    from qwenvl_tune.modeling.tiny import build_tiny_checkpoint

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_checkpoint(tmp_path_factory.mktemp(family) / family, family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    from qwenvl_tune.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "Data", n_train=6, n_valid=2, n_test=2, seed=3,
                         size=(280, 364))


def swatch(color, size=(112, 112), text: str | None = None) -> Image.Image:
    im = Image.new("RGB", size, color)
    if text:
        ImageDraw.Draw(im).text((8, 8), text, fill=(0, 0, 0))
    return im


def write_split(folder: Path, rows: list[dict], images: dict[str, Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, im in images.items():
        im.save(folder / name)
    with open(folder / "annotations.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return folder


def tiny_overrides(data: Path, model: Path, out: Path, **extra) -> dict:
    """Config overrides for fast CPU runs on a tiny model."""
    base = {
        "data.path": str(data), "model.name_or_path": str(model), "model.dtype": "float32",
        "train.precision": "32-true", "train.accelerator": "cpu", "train.accumulate_grad_batches": 1,
        "train.batch_size": 2, "train.warmup_steps": 0, "train.check_val_every_n_epoch": 1,
        "train.early_stopping_patience": 0, "train.log_every_n_steps": 1, "data.num_workers": 0,
        "data.min_pixels": 16 * 28 * 28, "data.max_pixels": 16 * 28 * 28, "generate.max_new_tokens": 48,
        "run.output_dir": str(out), "run.name": "run",
    }
    base.update(extra)
    return base


def equal_length_data(tmp_path: Path) -> Path:
    """8 documents of one image size and answers of equal token length: per-rank token means average to the
    global mean, so a data-parallel run can be compared with a single-process one."""
    rows = [{"image": f"{i}.png", "prefix": "read the code", "suffix": {"code": f"{1000 + 1111 * i}"}} for i in range(8)]
    imgs = {f"{i}.png": swatch((30 * i, 100, 200 - 20 * i), (112, 112)) for i in range(8)}
    write_split(tmp_path / "D" / "train", rows, imgs)
    write_split(tmp_path / "D" / "valid", rows[:3], {k: imgs[k] for k in ("0.png", "1.png", "2.png")})
    return tmp_path / "D"


def bad_pdfs(pages: list[Image.Image]) -> dict[str, bytes]:
    """PDFs a user can have that cannot be read: encrypted (pypdf's RC4, a password needed to open), corrupt
    (cut in half), empty (0 bytes), with zero pages."""
    import io

    import pypdf

    from qwenvl_tune.data.documents import pdf_bytes_from_images

    good = pdf_bytes_from_images(pages)
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(good))
    writer.encrypt("secret", algorithm="RC4-128")
    enc = io.BytesIO()
    writer.write(enc)
    empty = io.BytesIO()
    pypdf.PdfWriter().write(empty)
    return {"encrypted.pdf": enc.getvalue(), "corrupt.pdf": good[: len(good) // 2],
            "zero-bytes.pdf": b"", "no-pages.pdf": empty.getvalue()}


BAD_PDF_MESSAGES = {"encrypted.pdf": "encrypted", "corrupt.pdf": "corrupt", "zero-bytes.pdf": "empty",
                    "no-pages.pdf": "no pages"}


def step_loss_and_grads(step, batch):
    """A ``TrainStep``'s loss on a batch and the gradients it leaves, with LoRA dropout drawn the same way each call."""
    step.model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same LoRA dropout masks each time
    loss = step(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in step.model.named_parameters() if p.grad is not None}
