"""Tiny random-init Qwen-VL checkpoints for tests and the demo.

They are saved with ``save_pretrained`` and loaded back through exactly the
``from_pretrained`` path a real checkpoint takes. The tokenizer is a small
byte-level BPE trained on sample manifests, with Qwen's special tokens and
pre-tokenisation rule and a Qwen-VL chat template, so a CPU step does not pay
for 152k-entry logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from ..data.synthetic import corpus

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

# Qwen's special tokens, in Qwen's order (their ids in the tiny vocab differ, which is the point:
# nothing may hard-code them).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokeniser: digits split one by one, letters grouped, punctuation runs grouped.
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# A Qwen2-VL / Qwen2.5-VL style chat template: a default system turn when none is given,
# images as <|vision_start|><|image_pad|><|vision_end|>, turns closed by <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's template has no default system turn.
CHAT_TEMPLATE_QWEN3 = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")


def build_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer holding Qwen's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768)


def build_processor(family: Family = "qwen2_5_vl", min_pixels: int = 16 * 28 * 28, max_pixels: int = 64 * 28 * 28):
    tokenizer = build_tokenizer()
    if family == "qwen3_vl":
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

        ip = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return Qwen3VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(),
                                chat_template=CHAT_TEMPLATE_QWEN3)
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    ip = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                   size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    if family == "qwen2_vl":
        from transformers import Qwen2VLProcessor as Proc
    else:
        from transformers import Qwen2_5_VLProcessor as Proc
    return Proc(image_processor=ip, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|endoftext|>"],
    }


def build_config(family: Family, tokenizer, hidden: int = 64, layers: int = 2):
    ids = _token_ids(tokenizer)
    vocab = len(tokenizer)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=ids["bos_token_id"],
                eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    head_dim = hidden // 4
    section = [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 8 * 3 // 2]
    section[0] = head_dim // 2 - section[1] - section[2]
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        # MLP width 60: like the published 3420, not a multiple of 8, so the tiny model exercises the
        # fast path's aligned padding (modeling.align.align_vision_mlp) everywhere it is used.
        vision = dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=hidden,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], in_channels=3)
        return Qwen2_5_VLConfig(text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": section}},
                                vision_config=vision, **ids)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, mlp_ratio=2, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        return Qwen2VLConfig(text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": section}},
                             vision_config=vision, **ids)
    from transformers import Qwen3VLConfig

    text3 = {**text, "head_dim": head_dim, "rope_scaling": {"rope_type": "default", "mrope_section": section,
                                                            "mrope_interleaved": True}}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[1],
                  in_channels=3)
    return Qwen3VLConfig(text_config=text3, vision_config=vision, **ids)


def build_tiny_checkpoint(out: str | Path, family: Family = "qwen2_5_vl", seed: int = 0, hidden: int = 64,
                          layers: int = 2, min_pixels: int = 16 * 28 * 28, max_pixels: int = 64 * 28 * 28) -> Path:
    """Save a tiny random-init model + processor to ``out`` and return it."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    out = Path(out)
    processor = build_processor(family, min_pixels, max_pixels)
    config = build_config(family, processor.tokenizer, hidden, layers)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    ids = _token_ids(processor.tokenizer)
    model.generation_config = GenerationConfig(eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
                                               pad_token_id=ids["pad_token_id"], do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
