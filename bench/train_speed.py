"""Training-speed benchmark: the guide's recipe vs qwenvl-tune's paths, same batches, same GPU, same run.

    PYTHONPATH=src python bench/train_speed.py --size 3b --out bench/out     # on an H100/H200
    PYTHONPATH=src python bench/train_speed.py --size tiny --steps 2         # CPU smoke test
    python bench/results.py --add bench/out/train_speed_3b.json --run NAME   # record the run's rows

qwenvl-tune's variants run the product's own training step (``training.loop.micro_batch`` and
``optimizer_step`` on Fabric, as ``qwenvl-tune train`` does); ablations are flags on the fast-path
object. The guide's variants, and ``*_bench_copy`` (the benchmark's earlier copy of the step, kept for
a same-run comparison), run their own loops.

Random-init weights at the published Qwen2.5-VL configs (weight values do not change the arithmetic).
Samples are document pages whose sizes and answer lengths are drawn from a distribution
(~1700x2200 scans at max_pixels 1280*28*28 -> ~1,240 image tokens; ~520 answer tokens).
Every variant trains on the same sample sequence: optimizer step every 8 samples, gradient
clipping 1.0, LoRA r=8 alpha=16 on q_proj/v_proj unless stated.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# Variable-size document batches fragment the caching allocator (cudaFree churn in the profile).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from _env import env_info  # noqa: E402

IMAGE, VSTART, VEND, EOS, PAD = 151655, 151652, 151653, 151645, 151643
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEV == "cuda"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


SIZES = {
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
               vision_out=2048, tie=True),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
               vision_out=3584, tie=False),
}


def model_config(size: str):
    from transformers import Qwen2_5_VLConfig

    if size == "tiny":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
        vision = dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1])
        section = [2, 3, 3]
    else:
        s = SIZES[size]
        text = s["text"]
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=s["vision_out"],
                      fullatt_block_indexes=[7, 15, 23, 31])
        section = [16, 24, 24]
    text.update(max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
                rope_scaling={"type": "mrope", "mrope_section": section}, bos_token_id=PAD, eos_token_id=EOS,
                pad_token_id=PAD)
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
                  hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=151656,
                            vision_start_token_id=VSTART, vision_end_token_id=VEND,
                            tie_word_embeddings=text["tie_word_embeddings"])


@dataclass
class Sample:
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    grid: torch.Tensor
    image_tokens: int
    answer_tokens: int


def make_samples(n: int, seed: int, max_pixels: int, tiny: bool, pages: int = 1) -> list[Sample]:
    """Document samples; with ``pages`` > 1 each has that many pages, each drawn like a single-page sample's
    (the same per-page resolution), in one user turn before the prompt, and one answer."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        grids, runs = [], []
        for _ in range(pages):
            w = rng.uniform(1500, 1900) if not tiny else 300
            h = w * rng.uniform(1.2, 1.45)
            rh, rw = smart_resize(int(h), int(w), factor=28, min_pixels=256 * 28 * 28 if not tiny else 8 * 28 * 28,
                                  max_pixels=max_pixels)
            gh, gw = rh // 14, rw // 14
            grids.append([1, gh, gw])
            runs += [torch.tensor([VSTART]), torch.full((gh * gw // 4,), IMAGE), torch.tensor([VEND])]
        n_img = sum(gh * gw // 4 for _, gh, gw in grids)
        n_ans = int(min(900, max(200, rng.gauss(520, 110)))) if not tiny else 40
        prompt = torch.randint(1000, 150000, (30,), generator=g)
        answer = torch.randint(1000, 150000, (n_ans,), generator=g)
        ids = torch.cat([prompt[:20], *runs, prompt[20:], answer, torch.tensor([EOS, 198])])
        labels = torch.full_like(ids, -100)
        labels[len(ids) - n_ans - 2: len(ids) - 1] = ids[len(ids) - n_ans - 2: len(ids) - 1]
        pv = torch.cat([torch.randn(gh * gw, 3 * 2 * 14 * 14, generator=g) for _, gh, gw in grids])
        out.append(Sample(ids, labels, pv, torch.tensor(grids), n_img, n_ans))
    return out


def data_samples(data: str, ckpt: str, n: int, max_pixels: int) -> list[Sample]:
    """The first ``n`` training documents of a data folder, encoded by the product's encoder with the
    checkpoint's processor (as ``qwenvl-tune train`` encodes them), so the guide's rows and the real command
    (bench/train_command.py) train on the same token sequences. Sets the benchmark's token ids to the
    checkpoint's."""
    from qwenvl_tune.data.check import check_split
    from qwenvl_tune.data.collate import Encoder, RecordDataset
    from qwenvl_tune.data.positions import image_token_id
    from qwenvl_tune.modeling.load import load_processor

    global IMAGE, PAD
    processor = load_processor(ckpt, 256 * 28 * 28, max_pixels)
    report = check_split(data, "train", processor=processor)
    encoder = Encoder(processor)
    IMAGE, PAD = image_token_id(processor), encoder.pad_id
    dataset = RecordDataset(report.records[:n], encoder, "train")
    out = []
    for i in range(len(dataset)):
        it = dataset[i]
        ids = it["input_ids"]
        out.append(Sample(ids, it["labels"], it["pixel_values"], it["image_grid_thw"], int((ids == IMAGE).sum()),
                          int((it["labels"] != -100).sum())))
    return out


def batches(samples: list[Sample], batch_size: int, sort: bool, cfg=None, pad_to: int = 1):
    """Collated batches, as the trainer's loader makes them; with ``cfg``, with the vision tower's index tensors."""
    from qwenvl_tune.data.positions import VisionIndex

    order = list(range(len(samples)))
    if sort and batch_size > 1:
        # length-grouped batches (what the trainer's sampler does): little padding
        order.sort(key=lambda i: len(samples[i].input_ids))
    groups = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    # in random order, as the trainer's sampler hands out its length groups: a run of N steps sees a
    # sample of the lengths, not the N shortest batches (which understated peak memory until 2026-11-27 evening)
    random.Random(1).shuffle(groups)
    vision = VisionIndex.for_config(cfg) if cfg is not None else None
    return [collate_samples([samples[i] for i in g], vision, pad_to, rows=g) for g in groups]


def collate_samples(group: list[Sample], vision=None, pad_to: int = 1, rows: list[int] | None = None) -> dict:
    from qwenvl_tune.data.collate import collate
    from qwenvl_tune.data.positions import mrope_positions

    items = [{"input_ids": s.input_ids, "labels": s.labels, "pixel_values": s.pixel_values, "image_grid_thw": s.grid,
              "position_ids": mrope_positions(s.input_ids, s.grid, IMAGE, 2),
              # newer transformers compute mrope positions only when told which tokens are image tokens
              "mm_token_type_ids": (s.input_ids == IMAGE).long()} for s in group]
    if rows is not None:  # the samples' rows, as the trainer's dataset gives them (the image feature cache's keys)
        for item, row in zip(items, rows):
            item["index"] = row
    return collate(items, PAD, left=False, vision=vision, pad_to_multiple_of=pad_to)


def auto_batch(loop, fast, samples: list[Sample], cfg, v: dict):
    """The product's batch-size probe (``train.batch_size=auto``) on the benchmark's samples; ``card_gib`` sets the
    budget as if the card had that much memory (an 80 GB card on a 141 GB H200)."""
    from qwenvl_tune.data.positions import VisionIndex
    from qwenvl_tune.training.autobatch import probe_batch_size

    longest = sorted(samples, key=lambda s: -len(s.input_ids))
    vision = VisionIndex.for_config(cfg)
    fraction = loop.config.train.auto_batch_memory
    if v.get("card_gib"):
        total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        fraction *= min(1.0, v["card_gib"] / total_gib)
    return probe_batch_size(loop.fabric, loop.module, loop.optimizer, lambda b: collate_samples(longest[:b], vision),
                            len(samples), fraction, fast)


def flops_per_sample(cfg, s: Sample, method: str) -> float:
    """Model FLOPs of one training sample (matmuls + attention), frozen vision forward only."""
    t, v = cfg.text_config, cfg.vision_config
    T = len(s.input_ids)
    d, L, ff = t.hidden_size, t.num_hidden_layers, t.intermediate_size
    kv = d // t.num_attention_heads * t.num_key_value_heads
    per_tok = 2 * L * (d * d * 2 + 2 * d * kv + 3 * d * ff)
    lm_fwd = per_tok * T + 2 * L * T * T * d  # causal attention: half of 4*T^2*d
    head = 2 * d * t.vocab_size * s.answer_tokens  # only what a loss must compute
    patches = [int(n) for n in s.grid.prod(dim=1)]  # per page: attention runs within each page
    P = sum(patches)
    vd, vff = v.hidden_size, v.intermediate_size
    vis = 2 * v.depth * P * (4 * vd * vd + 3 * vd * vff) + 2 * (4 * vd) * 4 * vd * P // 4 * 2
    full_blocks = len(v.fullatt_block_indexes)
    vis += sum(4 * p * vd * (full_blocks * p + (v.depth - full_blocks) * 64) for p in patches)
    bwd = 2.0 if method == "full" else 1.0  # input-gradients only when the base is frozen
    return vis + (lm_fwd + head) * (1 + bwd)


def resolve_fast(v: dict, config, hf_config):
    """The product's fast path for a variant; ablations are flags on it (no patching)."""
    from qwenvl_tune.modeling.fastpath import FastPath

    fast = FastPath.resolve(config.model, hf_config, autocast=v.get("autocast", True) and CUDA, cuda=CUDA)
    flags = {"align_vision_mlp": v.get("align", True), "liger_rms_norm": v.get("liger_rms_norm", True),
             "lora_bf16_inputs": not v.get("lora_input_cast", False), "loader_indices": v.get("loader_index", True),
             "chunked_loss": v.get("chunked", True), "native_rms_norm": v.get("native_rms_norm", True),
             "frozen_vision_attention": v.get("vision_module", True), "compile_layers": compiles(v),
             "compile_vision": v.get("compile_vision", True), "compiled_4bit": v.get("compiled_4bit", True)}
    fast = fast.replace(**{k: getattr(fast, k) and on for k, on in flags.items()})
    if v.get("force_compile_vision") and fast.compile_layers:
        fast = fast.replace(compile_vision=True)  # a path the product does not take yet (QLoRA), measured first
    # Liger's SwiGLU and rotary stay out of compiled layers unless a variant asks for them inside
    return fast.replace(liger_language_model=v.get("liger_lm", not fast.compile_layers))


def compiles(v: dict) -> bool:
    """Whether a variant runs compiled decoder layers: the product's step with the fast path, unless it says not."""
    return bool(v.get("fast")) and v.get("loop", "product") == "product" and not v.get("trl") and v.get("compile", True)


def patches_liger_globally(v: dict) -> bool:
    """Liger's SwiGLU and rotary patches replace classes and functions of the transformers module for the whole
    process: a variant built after one that applied them gets Liger's modules too (its compiled layers would
    trace Liger's kernels), so those variants run last."""
    if v.get("trl"):
        return bool(v.get("liger"))
    return v.get("kernels") == "liger" and v.get("liger_lm", not compiles(v))


def variant_config(v: dict, ckpt: str, accum: int = 1):
    from qwenvl_tune.config import build_config

    overrides = {"model.name_or_path": ckpt, "model.method": v["method"], "model.fast_path": v["fast"],
                 "model.gradient_checkpointing": v.get("gc", False), "model.kernels": v.get("kernels", "none"),
                 "train.accumulate_grad_batches": accum, "train.lr": 2e-4, "train.warmup_steps": 0,
                 "train.gradient_clip_val": 1.0, "train.precision": "bf16-mixed" if CUDA else "32-true",
                 "train.accelerator": "cuda" if CUDA else "cpu"}
    if not v.get("image_cache", True):
        overrides["train.image_cache_gib"] = 0
    if "lora_dropout" in v:
        overrides["lora.dropout"] = v["lora_dropout"]
    if "targets" in v:
        overrides["lora.target_modules"] = v["targets"]
    return build_config(None, overrides)


def load_variant(v: dict, ckpt: str, cfg, accum: int = 1):
    """The model of a variant, prepared as the product prepares it (or as the guide wrote it)."""
    from qwenvl_tune.modeling.load import load_base_model, prepare_for_training

    if CUDA:  # process-wide: set for every variant, so one that asks for cuBLASLt does not leak into the next
        torch.backends.cuda.preferred_blas_library(v.get("blas", "cublas"))
    config = variant_config(v, ckpt, accum)
    if v.get("guide_misspelled"):
        # The guide as written: bnb_4bit_compute_type is not a BitsAndBytesConfig argument, so it is
        # accepted and ignored, and 4-bit layers compute in float32.
        from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_type=torch.bfloat16)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.bfloat16, quantization_config=q,
                                                            device_map={"": 0}, attn_implementation="sdpa")
    elif v.get("double_quant", True):
        model = load_base_model(config.model)
    else:  # a lead measured before it becomes an option: the product's 4-bit settings less double quantisation
        from unittest import mock

        from qwenvl_tune.modeling import load as load_mod

        q = load_mod.quantization_config(config.model)
        q.bnb_4bit_use_double_quant = False
        with mock.patch.object(load_mod, "quantization_config", lambda _: q):
            model = load_base_model(config.model)
        assert not any(getattr(getattr(p, "quant_state", None), "nested", False) for p in model.parameters())
    fast = resolve_fast(v, config, model.config)
    model = prepare_for_training(model, config, fast)
    if not v["method"] == "qlora":
        model.to(DEV)
    model.train()
    return model, config, fast


def product_loop(v: dict, ckpt: str, cfg, accum: int):
    """The product's own training step (``training.loop.micro_batch`` + ``optimizer_step``) on Fabric, as
    ``qwenvl-tune train`` runs it: same module wrapper, precision plugin, clipping, checks and logging."""
    from lightning_fabric import Fabric

    from qwenvl_tune.training.console import Console
    from qwenvl_tune.training.loop import Loop
    from qwenvl_tune.training.signals import StopRequest
    from qwenvl_tune.training.state import Progress
    from qwenvl_tune.training.step import TrainStep, build_scheduler

    model, config, fast = load_variant(v, ckpt, cfg, accum)
    fabric = Fabric(accelerator=config.train.accelerator, devices=1, precision=config.train.precision)
    from qwenvl_tune.training.run import _feature_cache

    module = fabric.setup_module(TrainStep(model, fast, _feature_cache(model, config, fast, fabric)))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = fabric.setup_optimizers(torch.optim.AdamW(params, lr=config.train.lr))
    loop = Loop(fabric, module, opt, build_scheduler(opt, config, 10**6), None, None, None, None, config, Progress(),
                StopRequest(announce=False), Console(fabric, [], 10**9, 0, 10**9))
    return loop, fast


def train_loss(model, batch, fast: bool, loader_index: bool = True, chunked: bool = True):
    """The loss as the benchmark computed it before it called the product's step (kept for the same-run
    comparison, variant ``ours_lora_b2_liger_bench_copy``, and for the guide's plain path)."""
    from qwenvl_tune.modeling.loss import answer_only_loss, with_loader_indices

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")}
    if fast:
        if not loader_index:  # the model works out every index itself (before 2026-11-27)
            return answer_only_loss(model, inputs, batch["labels"], chunked=chunked)
        # what the trainer does: rope positions, vision-tower indices and answer positions from the loader
        inputs = with_loader_indices(inputs, batch)
        return answer_only_loss(model, inputs, batch["labels"], batch["answer_positions"], chunked=chunked)
    return model(**inputs, labels=batch["labels"]).loss


def sync_audit(step) -> list[tuple[int, str]]:
    """Run ``step`` with CUDA's sync debug mode on: every operation that makes the host wait for the GPU warns;
    returns (count, python call site) pairs, most frequent first."""
    import collections
    import warnings

    sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.set_sync_debug_mode(0)
            sync()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return [(n, site) for site, n in sites.most_common()]


def run_variant(v: dict, ckpt: str, cfg, samples: list[Sample], steps: int, warmup: int) -> dict:
    free()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    bs = v["batch"]
    probe = loop = None
    if bs == "auto":  # the product's probe picks the batch, under the budget of the card named by card_gib
        from qwenvl_tune.training.autobatch import accumulation_for

        loop, fast = product_loop(v, ckpt, cfg, 1)
        probe = auto_batch(loop, fast, samples, cfg, v)
        print(probe.describe(), flush=True)
        bs = probe.chosen
        loop.config.train.accumulate_grad_batches = accum = accumulation_for(bs)
        free()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()  # the probe's own peaks are not the training's
    else:
        accum = max(1, 8 // bs)
    product = v["fast"] and v.get("loop", "product") == "product"
    index = v["fast"] and v.get("loader_index", True)
    pad_to = v.get("pad_to", 1)  # the trainer does not round lengths (the _pad64/_pad128 variants measured it)
    data = batches(samples, bs, sort=v.get("sort", True), cfg=cfg if index else None, pad_to=pad_to)
    pinned = v.get("pin", v["fast"]) and CUDA  # the trainer pins its batches (since 2026-11-27); the guide does not
    if pinned:  # what a DataLoader with pin_memory=True hands over: page-locked batches
        data = [{k: (t.pin_memory() if torch.is_tensor(t) else t) for k, t in b.items()} for b in data]
    scope = contextlib.ExitStack()
    if v.get("inductor"):  # Inductor settings for this variant's compilations only (leads of issue 20, measured A/B)
        import torch._inductor.config as inductor_config

        scope.enter_context(inductor_config.patch(v["inductor"]))
    if product:
        from qwenvl_tune.training.loop import micro_batch, optimizer_step

        if loop is None:
            loop, fast = product_loop(v, ckpt, cfg, accum)
        model = loop.module.module.model
        scope.enter_context(fast.training(model))
        pending: list = []

        def step(i: int):
            ends = (i + 1) % accum == 0
            if v.get("mark_step"):  # CUDA graph trees: a new micro-batch may overwrite the last one's graph outputs
                torch.compiler.cudagraph_mark_step_begin()
            pending.append(micro_batch(loop, data[i % len(data)], ends))
            if ends:
                optimizer_step(loop, pending)
                pending.clear()
            return pending[-1][0] if pending else None
    else:
        model, _, fast = load_variant(v, ckpt, cfg)
        if v["fast"]:
            scope.enter_context(fast.training(model))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4)
        autocast = torch.autocast(DEV, dtype=torch.bfloat16, enabled=v.get("autocast", True))

        def step(i: int):
            b = {k: (t.to(DEV, non_blocking=True) if torch.is_tensor(t) else t) for k, t in data[i % len(data)].items()}
            b["pixel_values"] = b["pixel_values"].to(torch.bfloat16 if CUDA else torch.float32)
            with autocast:
                loss = train_loss(model, b, v["fast"], index, v.get("chunked", True)) / accum
            loss.backward()
            if (i + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss

    if v.get("warm_epoch"):  # one whole pass first: the timed batches are ones already seen (shapes included)
        warmup = len(data)
    t_w = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - t_w  # with compiled layers, their compilation happens here
    if v.get("skip_guards"):  # after warm-up every shape has its graphs: check only the guards that tell them apart
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        scope.callback(torch.compiler.set_stance, "default")
    audit = None
    if v.get("sync_audit") and CUDA:
        audit = sync_audit(lambda: step(warmup - 1))
        print(f"SYNCS {v['name']}: {sum(n for n, _ in audit)} in one micro-step", flush=True)
        for n, site in audit[:15]:
            print(f"  {n:4d}  {site}", flush=True)
    if v.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        # micro-batches the warm-up already ran, so their shapes have graphs: profiling unseen ones caught a
        # recompilation in 2026-12-03e's profile (4% GPU-busy, 11 s of Inductor for two micro-batches). One whole
        # optimizer step of them where the warm-up holds one, so no micro-batch is left pending for the timing.
        if warmup >= accum:
            seen = range((warmup // accum - 1) * accum, warmup // accum * accum)
        else:
            seen = range(warmup, warmup + 2)
            print(f"PROFILE note: warm-up {warmup} < {accum} micro-batches a step: profiling unseen ones", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t_p = time.perf_counter()
            for i in seen:
                step(i)
            sync()
            wall = time.perf_counter() - t_p
        ka = prof.key_averages()
        from torch.autograd import DeviceType

        # kernels only: an operator's own device time is its kernels' again (summing both counted it twice,
        # until 2026-12-02)
        gpu = sum(e.self_device_time_total for e in ka if e.device_type == DeviceType.CUDA) / 1e6
        print(f"PROFILE {v['name']}: wall {wall:.3f}s for {len(seen)} micro-batches ({seen.start}-{seen.stop - 1}), "
              f"GPU kernel time {gpu:.3f}s, GPU busy "
              f"{100 * gpu / wall:.0f}%", flush=True)
        print(ka.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=70), flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70), flush=True)
    t0 = time.perf_counter()
    n_samples = n_tokens = 0
    for i in range(warmup, warmup + steps):
        step(i)
        b = data[i % len(data)]
        n_samples += b["input_ids"].shape[0]
        n_tokens += int(b["attention_mask"].sum())
    sync()
    dt = time.perf_counter() - t0
    sample_flops = sum(flops_per_sample(cfg, s, v["method"]) for s in samples) / len(samples)
    scope.close()
    res = {"name": v["name"], "desc": v["desc"], "step": "product" if product else ("bench copy" if v["fast"] else "guide"),
           "batch": bs, "pad_to_multiple_of": pad_to, "pinned": pinned, "samples_per_s": n_samples / dt,
           "tokens_per_s": n_tokens / dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
           "tflops": sample_flops * n_samples / dt / 1e12, "steps": steps, "warmup_s": round(warmup_s, 1),
           "warmup_steps": warmup, "compiled_layers": bool(product and fast.compile_layers)}
    if probe is not None:
        res["auto_batch"] = probe.describe()
    if audit is not None:
        res["host_syncs_per_micro_step"] = sum(n for n, _ in audit)
        res["host_sync_sites"] = [f"{n} {site}" for n, site in audit]
    del model
    if product:
        del loop
    free()
    return res


def run_trl(v: dict, ckpt: str, cfg, samples: list[Sample], steps: int, warmup: int) -> dict:
    """TRL's ``SFTTrainer`` on the same samples in the same process: LoRA r8 on q/v (PEFT), the loss on the answer
    tokens only (the batches' labels), bf16, its own training loop and loss; ``liger`` turns on its
    ``use_liger_kernel``. The batches are the benchmark's own (length-grouped, as for qwenvl-tune), handed over by
    a collator, so only the trainers differ. Timed between the end of the warm-up steps and the last step."""
    import tempfile as _tf

    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, TrainerCallback
    import trl
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    free()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    bs = v["batch"]
    accum = max(1, 8 // bs)
    data = batches(samples, bs, sort=True)
    for b in data:
        b.pop("position_ids", None)  # TRL's model computes its own rope positions
        b.pop("answer_positions", None)
    n_micro = (warmup + steps) * accum

    class Collate:
        def __init__(self):
            self.i = 0

        def __call__(self, rows):
            batch = {k: t for k, t in data[self.i % len(data)].items()
                     if k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw",
                              "mm_token_type_ids")}
            self.i += 1
            return batch

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync()
            times.append(time.perf_counter())

    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.bfloat16 if CUDA else torch.float32,
                                                        attn_implementation="sdpa")
    # q/v; PEFT's all-linear (every linear layer, the vision tower's too); or every linear layer of the language
    # model only, the set qwenvl-tune's all-linear adapts (a regex PEFT matches against full module names)
    targets = {"all-linear": "all-linear",
               "lm-linear": r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"}.get(
        v.get("targets"), ["q_proj", "v_proj"])
    args = SFTConfig(output_dir=_tf.mkdtemp(prefix="trl-"), per_device_train_batch_size=bs,
                     gradient_accumulation_steps=accum, max_steps=warmup + steps, learning_rate=2e-4,
                     lr_scheduler_type="constant", bf16=CUDA, use_cpu=not CUDA, logging_steps=10**6,
                     save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
                     gradient_checkpointing=v.get("gc", False), use_liger_kernel=v.get("liger", False),
                     dataset_kwargs={"skip_prepare_dataset": True}, max_grad_norm=1.0)
    # the batches come tokenised; TRL only wants a tokenizer object (the random-init checkpoint has none)
    from tokenizers import Tokenizer, models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>")),
                                        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"idx": list(range(n_micro))}),
                         data_collator=Collate(), callbacks=[Clock()], processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                                                task_type="CAUSAL_LM"))
    trainer.train()
    dt = times[-1] - times[warmup - 1]
    n_samples = steps * accum * bs
    n_tokens = sum(int(data[(k) % len(data)]["attention_mask"].sum()) for k in range(warmup * accum, n_micro))
    sample_flops = sum(flops_per_sample(cfg, s, "lora") for s in samples) / len(samples)
    res = {"name": v["name"], "desc": v["desc"], "step": f"trl {trl.__version__}", "batch": bs,
           "samples_per_s": n_samples / dt, "tokens_per_s": n_tokens / dt,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
           "tflops": sample_flops * n_samples / dt / 1e12, "steps": steps * accum}
    del trainer, model
    free()
    return res


def numerics_check(ckpt: str, cfg, samples: list[Sample]) -> dict:
    """Same batch, same weights: plain and fast paths in bf16 autocast, each against a float32 plain-path reference.

    The fast path passes when its distance to the float32 reference is no larger than the plain
    bf16 path's (both are bf16 roundings of the same function).
    """
    from qwenvl_tune.modeling.compiled import CompiledLayers

    runs = {"ref_fp32": (False, torch.float32), "plain_bf16": (False, torch.bfloat16), "fast_bf16": (True, torch.bfloat16),
            "compiled_bf16": (True, torch.bfloat16)}
    out, grads = {}, {}
    for name, (fast, dtype) in runs.items():
        torch.manual_seed(0)
        # no dropout: each path would draw its own masks (the fast path drops out its bf16 LoRA input,
        # the plain path a float32 copy), and the comparison would measure the draw, not the arithmetic
        model, _, fp = load_variant({"method": "lora", "fast": fast, "lora_dropout": 0.0}, ckpt, cfg)
        if dtype == torch.float32:
            model.float()
        b = {k: (t.to(DEV) if torch.is_tensor(t) else t) for k, t in batches(samples[:1], 1, False, cfg=cfg)[0].items()}
        b["pixel_values"] = b["pixel_values"].to(dtype)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=dtype != torch.float32), \
                (fp.training(model) if fast and dtype != torch.float32 else contextlib.nullcontext()), \
                (CompiledLayers(model).active() if name == "compiled_bf16" else contextlib.nullcontext()):
            loss = train_loss(model, b, fast)
        loss.backward()
        out[f"loss_{name}"] = float(loss.detach())
        grads[name] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        del model
        free()
    ref = grads["ref_fp32"]
    den = sum(float(g.norm() ** 2) for g in ref.values())
    for name in ("plain_bf16", "fast_bf16", "compiled_bf16"):
        num = sum(float((grads[name][n] - ref[n]).norm() ** 2) for n in ref)
        out[f"grad_rel_err_{name}"] = math.sqrt(num / den)
        out[f"loss_rel_err_{name}"] = abs(out[f"loss_{name}"] - out["loss_ref_fp32"]) / abs(out["loss_ref_fp32"])
    return out


VARIANTS = [
    {"name": "guide_qlora_as_written", "method": "qlora", "fast": False, "batch": 1, "autocast": False,
     "guide_misspelled": True, "desc": "guide as written: QLoRA, misspelt compute dtype (float32 compute), sdpa, batch 1"},
    {"name": "guide_qlora_bf16", "method": "qlora", "fast": False, "batch": 1, "autocast": False,
     "desc": "guide, compute dtype fixed to bf16"},
    {"name": "guide_lora_bf16", "method": "lora", "fast": False, "batch": 1, "autocast": False,
     "desc": "guide: bf16 LoRA r=8 q/v, sdpa, batch 1"},
    # TRL's SFTTrainer (the peer) on the same batches in the same process; its liger variants run with the others last
    {"name": "trl_lora_b2", "trl": True, "method": "lora", "fast": False, "batch": 2,
     "desc": "TRL SFTTrainer, LoRA r8 q/v, answer-only loss, batch 2"},
    {"name": "trl_lora_b2_all_linear", "trl": True, "method": "lora", "fast": False, "batch": 2, "targets": "all-linear",
     "desc": "TRL SFTTrainer, PEFT all-linear LoRA (vision tower included), batch 2"},
    {"name": "trl_lora_b2_lm_linear", "trl": True, "method": "lora", "fast": False, "batch": 2, "targets": "lm-linear",
     "desc": "TRL SFTTrainer, LoRA on every linear layer of the language model (qwenvl-tune's all-linear set), batch 2"},
    {"name": "ours_lora_b2_all_linear", "method": "lora", "fast": True, "batch": 2, "targets": "all-linear",
     "desc": "qwenvl-tune lora, batch 2, all-linear on the language model, no Triton kernels"},
    {"name": "ours_lora_b1", "method": "lora", "fast": True, "batch": 1, "desc": "qwenvl-tune lora, batch 1"},
    {"name": "ours_lora_b1_model_index", "method": "lora", "fast": True, "batch": 1, "loader_index": False,
     "desc": "qwenvl-tune lora, batch 1, rope/vision indices computed by the model each step (before 2026-11-27)"},
    {"name": "ours_lora_b1_unchunked", "method": "lora", "fast": True, "batch": 1, "chunked": False,
     "desc": "qwenvl-tune lora, batch 1, all answer logits at once (before 2026-11-27)"},
    {"name": "ours_lora_b2_unchunked", "method": "lora", "fast": True, "batch": 2, "chunked": False,
     "desc": "qwenvl-tune lora, batch 2 length-grouped, all answer logits at once (before 2026-11-27)"},
    {"name": "ours_lora_b1_pad64", "method": "lora", "fast": True, "batch": 1, "pad_to": 64,
     "desc": "qwenvl-tune lora, batch 1, length rounded up to a multiple of 64"},
    {"name": "ours_lora_b1_pad128", "method": "lora", "fast": True, "batch": 1, "pad_to": 128,
     "desc": "qwenvl-tune lora, batch 1, length rounded up to a multiple of 128"},
    {"name": "ours_lora_b2_pad64", "method": "lora", "fast": True, "batch": 2, "pad_to": 64,
     "desc": "qwenvl-tune lora, batch 2 length-grouped, length rounded up to a multiple of 64"},
    {"name": "ours_lora_b4", "method": "lora", "fast": True, "batch": 4, "desc": "qwenvl-tune lora, batch 4 length-grouped"},
    {"name": "ours_lora_b2", "method": "lora", "fast": True, "batch": 2, "desc": "qwenvl-tune lora, batch 2 length-grouped"},
    {"name": "ours_qlora_b1", "method": "qlora", "fast": True, "batch": 1, "desc": "qwenvl-tune qlora, batch 1"},
    {"name": "ours_qlora_b4", "method": "qlora", "fast": True, "batch": 4, "desc": "qwenvl-tune qlora, batch 4 length-grouped"},
    {"name": "ours_qlora_lowmem", "method": "qlora", "fast": True, "batch": 1, "gc": True,
     "desc": "qwenvl-tune qlora + gradient checkpointing, batch 1"},
    # Eager decoder layers with Liger's SwiGLU and rotary: the defaults before model.compile (model.compile=off)
    {"name": "ours_lora_b2_liger_eager", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "compile": False, "desc": "the defaults before model.compile: eager decoder layers with Liger's SwiGLU and rotary"},
    {"name": "ours_lora_b2_liger_eager_later_epoch", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "compile": False, "warm_epoch": True, "desc": "the defaults before model.compile, in a later epoch (image features kept)"},
    {"name": "ours_qlora_b2_liger_eager", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "compile": False, "desc": "qlora defaults before model.compile (eager decoder layers, Liger)"},
    {"name": "ours_lora_b2_liger_all_linear_eager", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "targets": "all-linear", "compile": False, "desc": "all-linear LoRA, eager decoder layers with Liger"},
    {"name": "ours_lora_auto_liger_80gb_eager_later_epoch", "method": "lora", "fast": True, "batch": "auto",
     "kernels": "liger", "card_gib": 80, "compile": False, "warm_epoch": True,
     "desc": "train.batch_size=auto, 80 GB budget, eager decoder layers with Liger, later epoch"},
    {"name": "ours_qlora_b2_liger_compiled_vision", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "force_compile_vision": True, "desc": "qlora defaults with the frozen 4-bit vision tower's blocks compiled too "
                                           "(not the product's default until measured; equal to eager on CPU)"},
    {"name": "ours_lora_b2_liger_text_compiled", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "compile_vision": False, "desc": "the defaults with only the language model's layers compiled (the vision tower "
                                      "eager, with Liger's rotary)"},
    # compiled decoder layers that trace Liger's SwiGLU and rotary kernels instead of letting Inductor fuse them
    {"name": "ours_lora_b2_liger_compiled_with_liger", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "liger_lm": True, "desc": "compiled decoder layers with Liger's SwiGLU and rotary inside"},
    # Liger's rotary patch is process-wide: these run last, after every variant they are compared with.
    {"name": "ours_lora_b1_liger", "method": "lora", "fast": True, "batch": 1, "kernels": "liger",
     "desc": "qwenvl-tune lora + liger kernels, batch 1"},
    {"name": "ours_lora_b2_liger", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "desc": "the defaults: lora, batch 2 length-grouped, compiled decoder layers and vision blocks, the product's "
             "step"},
    # Host-time leads after the 2026-12-03 profile (60% GPU-busy; 89 ms of 371 ms of host time in Inductor's Python
    # wrappers, 14 ms in Dynamo's guards per two micro-batches); not the product's defaults, to be measured with
    # --isolate since they change process-wide compiler settings
    {"name": "ours_lora_b2_liger_cpp_wrapper", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "inductor": {"cpp_wrapper": True},
     "desc": "the defaults with Inductor's C++ wrapper (graphs launched from compiled code, not Python)"},
    {"name": "ours_lora_b2_liger_cudagraphs", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "inductor": {"triton.cudagraphs": True}, "mark_step": True,
     "desc": "the defaults with the compiled layers' graphs replayed as CUDA graphs (one per layer and shape)"},
    {"name": "ours_lora_b2_liger_skip_guards", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "skip_guards": True,
     "desc": "the defaults, Dynamo checking after warm-up only the guards that tell its graphs apart"},
    {"name": "ours_lora_b2_liger_cudagraphs_pad128", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "inductor": {"triton.cudagraphs": True}, "mark_step": True, "pad_to": 128,
     "desc": "the defaults with CUDA graphs, lengths rounded up to a multiple of 128 (few shapes to record)"},
    {"name": "ours_lora_b2_liger_cpp_skip_guards", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "inductor": {"cpp_wrapper": True}, "skip_guards": True,
     "desc": "the defaults with Inductor's C++ wrapper and Dynamo's guards skipped after warm-up"},
    {"name": "ours_qlora_b2_liger_cpp_wrapper", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "inductor": {"cpp_wrapper": True}, "desc": "qlora defaults with Inductor's C++ wrapper"},
    {"name": "ours_lora_b2_liger_bench_copy", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "loop": "copy", "desc": "the same, through the benchmark's own copy of the step (before 2026-12-02)"},
    # before 2026-12-02 evening: Liger's RMSNorm, the library's vision attention with its element-wise rotary
    {"name": "ours_lora_b2_liger_before_native_norm", "method": "lora", "fast": True, "batch": 2, "kernels": "liger", "compile": False,
     "native_rms_norm": False, "vision_module": False,
     "desc": "the defaults before 2026-12-02 evening: Liger's RMSNorm, the library's vision attention and rotary"},
    {"name": "ours_lora_b2_liger_no_vision_module", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "vision_module": False, "desc": "the defaults without the frozen vision attention module (the library's rotary)"},
    {"name": "ours_lora_b2_liger_seen_shapes", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "warm_epoch": True, "image_cache": False,
     "desc": "the defaults without the image feature cache, timed on a second pass over the same batches (every "
             "shape seen)"},
    {"name": "ours_lora_b2_liger_later_epoch", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "warm_epoch": True, "desc": "the defaults in a later epoch: a second pass over the same batches, the frozen "
                                 "tower's output kept from the first (train.image_cache_gib)"},
    {"name": "ours_lora_auto_liger_80gb_later_epoch", "method": "lora", "fast": True, "batch": "auto",
     "kernels": "liger", "card_gib": 80, "warm_epoch": True,
     "desc": "train.batch_size=auto, 80 GB budget, in a later epoch (image features kept from the first)"},
    {"name": "ours_qlora_b2_liger_later_epoch", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "warm_epoch": True, "desc": "qlora defaults in a later epoch (image features kept from the first)"},
    {"name": "ours_lora_b2_liger_all_linear_later_epoch", "method": "lora", "fast": True, "batch": 2,
     "kernels": "liger", "targets": "all-linear", "warm_epoch": True,
     "desc": "all-linear LoRA (language model), Liger, batch 2, in a later epoch (image features kept)"},
    {"name": "ours_lora_b2_liger_pad64", "method": "lora", "fast": True, "batch": 2, "kernels": "liger", "pad_to": 64,
     "desc": "the defaults, lengths rounded up to a multiple of 64"},
    {"name": "ours_lora_auto_liger_80gb_before_native_norm", "method": "lora", "fast": True, "batch": "auto",
     "kernels": "liger", "compile": False, "card_gib": 80, "native_rms_norm": False, "vision_module": False,
     "desc": "train.batch_size=auto, 80 GB budget, before 2026-12-02 evening (Liger RMSNorm, library vision attention)"},
    {"name": "ours_qlora_b2_liger", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "desc": "qwenvl-tune qlora + liger kernels, batch 2 length-grouped"},
    # QLoRA's 4-bit products inside the compiled layers: unpacked by tensor operations that Inductor fuses (the
    # product since 2026-12-03, eleventh session) against bitsandbytes' own operators there (before)
    {"name": "ours_qlora_b2_liger_bnb_ops", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "compiled_4bit": False, "desc": "qlora defaults with bitsandbytes' operators inside the compiled layers (before "
                                     "2026-12-03, eleventh session)"},
    # QLoRA's host time (issue 20 lead): double quantisation dequantises each 4-bit weight's block scales first
    # (bitsandbytes' dequantize_blockwise and an add, forward and backward); float32 scales take one custom op per
    # dequantisation instead, for ~0.15 GiB more at 3B (4 bytes per 64 weights instead of ~1)
    {"name": "ours_qlora_b2_liger_single_quant", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "double_quant": False, "desc": "qlora defaults without double quantisation (float32 block scales)"},
    {"name": "ours_lora_b4_liger", "method": "lora", "fast": True, "batch": 4, "kernels": "liger",
     "desc": "qwenvl-tune lora + liger kernels, batch 4 length-grouped"},
    {"name": "ours_lora_b2_liger_all_linear", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "targets": "all-linear", "desc": "qwenvl-tune lora + liger, batch 2, LoRA on every linear layer of the language "
                                     "model (lora.target_modules all-linear; the frozen vision tower has none)"},
    {"name": "ours_lora_auto_liger_80gb", "method": "lora", "fast": True, "batch": "auto", "kernels": "liger",
     "card_gib": 80, "desc": "qwenvl-tune lora + liger, train.batch_size=auto with the budget of an 80 GB card"},
    {"name": "ours_lora_auto_liger", "method": "lora", "fast": True, "batch": "auto", "kernels": "liger",
     "desc": "qwenvl-tune lora + liger, train.batch_size=auto on this card"},
    {"name": "trl_lora_b2_liger", "trl": True, "method": "lora", "fast": False, "batch": 2, "liger": True,
     "desc": "TRL SFTTrainer with use_liger_kernel, LoRA r8 q/v, batch 2"},
    {"name": "trl_lora_b4_liger", "trl": True, "method": "lora", "fast": False, "batch": 4, "liger": True,
     "desc": "TRL SFTTrainer with use_liger_kernel, LoRA r8 q/v, batch 4"},
    {"name": "trl_lora_b8_liger", "trl": True, "method": "lora", "fast": False, "batch": 8, "liger": True,
     "desc": "TRL SFTTrainer with use_liger_kernel, LoRA r8 q/v, batch 8 (its best configuration is the faster of "
             "batch 4 and 8: both fit an 80 GB card)"},
    {"name": "ours_lora_b2_two_page", "method": "lora", "fast": True, "batch": 2, "pages": 2,
     "desc": "qwenvl-tune lora, batch 2, two-page documents (no Triton kernels: also runs on a CPU)"},
    {"name": "ours_lora_b2_liger_two_page", "method": "lora", "fast": True, "batch": 2, "kernels": "liger", "pages": 2,
     "desc": "the defaults on two-page documents (two pages at the single-page resolution, one answer); samples/s "
             "counts documents"},
    {"name": "ours_qlora_b2_liger_two_page", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "pages": 2, "desc": "qlora defaults on two-page documents; samples/s counts documents"},
    {"name": "ours_lora_b2_liger_pageable", "method": "lora", "fast": True, "batch": 2, "kernels": "liger", "pin": False,
     "desc": "qwenvl-tune lora + liger, batch 2, batches in pageable memory (before 2026-11-27)"},
    {"name": "ours_lora_b2_liger_cublaslt", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "blas": "cublaslt", "desc": "qwenvl-tune lora + liger, batch 2, cuBLASLt preferred"},
    {"name": "ours_lora_b2_liger_unaligned", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "align": False, "desc": "qwenvl-tune lora + liger, batch 2, vision MLP at 3420 wide, unaligned (before 2026-11-27 evening)"},
    {"name": "ours_qlora_b2_liger_unaligned", "method": "qlora", "fast": True, "batch": 2, "kernels": "liger",
     "align": False, "desc": "qwenvl-tune qlora + liger, batch 2, vision MLP at 3420 wide, unaligned (before 2026-11-27 evening)"},
    {"name": "ours_lora_b4_liger_unaligned", "method": "lora", "fast": True, "batch": 4, "kernels": "liger",
     "align": False, "desc": "qwenvl-tune lora + liger, batch 4, vision MLP at 3420 wide, unaligned (before 2026-11-27 evening)"},
    # Liger patches classes process-wide: run this one in its own process, not after another liger variant.
    {"name": "ours_lora_b2_liger_no_rmsnorm", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "liger_rms_norm": False, "desc": "qwenvl-tune lora + liger without its RMSNorm, batch 2"},
    {"name": "ours_lora_b2_liger_fp32cast", "method": "lora", "fast": True, "batch": 2, "kernels": "liger",
     "lora_input_cast": True,
     "desc": "qwenvl-tune lora + liger, batch 2, LoRA input copied to float32 (before 2026-11-27 evening)"},
    {"name": "ours_qlora_b1_liger", "method": "qlora", "fast": True, "batch": 1, "kernels": "liger",
     "desc": "qwenvl-tune qlora + liger kernels, batch 1"},
]


# Named sets for --variants. every-row: each row issue 20 asks for in one process (the TRL rows need trl,
# datasets and accelerate on the machine), with the eager A/B of the compiled layers: about 9.5 minutes on an H200
# at 3B with the numerics check, close to a 10-minute limit per command (drop the eager rows to fit).
PRESETS = {
    "every-row": ["guide_qlora_as_written", "guide_lora_bf16", "trl_lora_b2", "trl_lora_b2_all_linear",
                  "trl_lora_b2_lm_linear", "ours_qlora_lowmem", "ours_lora_b2_liger", "ours_lora_b2_liger_later_epoch",
                  "ours_lora_auto_liger_80gb", "ours_lora_auto_liger_80gb_later_epoch", "ours_qlora_b2_liger",
                  "ours_qlora_b2_liger_later_epoch", "ours_lora_b2_liger_all_linear",
                  "ours_lora_b2_liger_all_linear_later_epoch", "ours_lora_b2_liger_text_compiled",
                  "ours_lora_b2_liger_eager", "ours_lora_b2_liger_eager_later_epoch", "ours_qlora_b2_liger_eager",
                  "ours_lora_b2_liger_all_linear_eager", "trl_lora_b2_liger", "trl_lora_b4_liger"],
    # QLoRA's first epoch (issue 20's unmet target) with and without compiled 4-bit vision blocks, beside the guide
    "qlora-vision": ["guide_qlora_as_written", "guide_lora_bf16", "ours_qlora_b2_liger", "ours_qlora_b2_liger_compiled_vision",
                     "ours_lora_b2_liger"],
    # The headline ratios (issue 20's targets) without one process's history: each in a process of its own
    # (--isolate), warmed up over half the documents so first-use costs are out of the timed half, e.g.
    #   --variants headline --isolate --samples 128 --warmup 32 --steps 32   (two calls of ~6 minutes: split it)
    # A/B, each in its own process and interleaved: --variants qlora-quant --isolate --repeat 2 --no-numerics
    "qlora-quant": ["guide_qlora_as_written", "ours_qlora_b2_liger", "ours_qlora_b2_liger_single_quant"],
    # the same for the 4-bit products unpacked in the compiled graphs; with them, compiled 4-bit vision blocks too
    "qlora-nf4": ["guide_qlora_as_written", "ours_qlora_b2_liger", "ours_qlora_b2_liger_bnb_ops",
                  "ours_qlora_b2_liger_compiled_vision"],
    "headline": ["guide_qlora_as_written", "guide_lora_bf16", "ours_lora_b2_liger", "ours_qlora_b2_liger",
                 "ours_lora_b2_liger_all_linear", "trl_lora_b2_lm_linear", "trl_lora_b2_liger", "trl_lora_b4_liger"],
    # the host-time leads beside the defaults, each in its own process (--isolate; they set compiler options)
    # (A/B against the defaults in the same call; about 7.5 minutes on an H200 with --samples 128 --warmup 32
    # --steps 32)
    "host-leads": ["ours_lora_b2_liger", "ours_lora_b2_liger_cpp_wrapper", "ours_lora_b2_liger_skip_guards",
                   "ours_lora_b2_liger_cpp_skip_guards", "ours_lora_b2_liger_cudagraphs",
                   "ours_lora_b2_liger_cudagraphs_pad128"],
    "7b": ["guide_qlora_as_written", "ours_lora_b2_liger", "ours_lora_b2_liger_later_epoch", "ours_qlora_b2_liger",
           "ours_qlora_lowmem", "ours_lora_auto_liger_80gb_later_epoch"],
}


def chosen_variants(spec: str) -> list[dict]:
    """``all``, a preset's name, or names joined by commas; in the order that keeps Liger's process-wide patches
    last. An unknown name is an error, not a silently shorter run."""
    if spec == "all":
        names = [v["name"] for v in VARIANTS]
    else:
        names = [n for part in spec.split(",") if part for n in PRESETS.get(part, [part])]
    known = {v["name"] for v in VARIANTS}
    unknown = [n for n in names if n not in known and n != "none"]
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(unknown)} (presets: {', '.join(PRESETS)})")
    return sorted((v for v in VARIANTS if v["name"] in names), key=patches_liger_globally)


def summary_table(rows: list[dict], base: dict | None, size: str) -> str:
    """One line per variant; with several rounds, the median samples/s and its range over the rounds."""
    import statistics

    lines = [f"| variant ({size}) | batch | samples/s | range over rounds | tokens/s | peak GiB | model TFLOP/s | x guide |",
             "|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    for name in names:
        runs = [r for r in rows if r["name"] == name and "error" not in r]
        if not runs:
            err = next(r for r in rows if r["name"] == name)
            lines.append(f"| {err['desc']} | | error: {err['error'][:80]} | | | | | |")
            continue
        sps = sorted(r["samples_per_s"] for r in runs)
        mid = statistics.median(sps)
        r = runs[0]
        spread = f"{sps[0]:.2f}-{sps[-1]:.2f} ({len(sps)})" if len(sps) > 1 else ""
        ratio = mid / base["samples_per_s"] if base else float("nan")
        lines.append(f"| {r['desc']} | {r['batch']} | {mid:.2f} | {spread} | {statistics.median(x['tokens_per_s'] for x in runs):.0f} | "
                     f"{max(x['peak_gib'] for x in runs):.1f} | {statistics.median(x['tflops'] for x in runs):.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def save_random_checkpoint(cfg, size: str, where: str = "") -> str:
    """The random-init model at the published config, saved once (into ``where`` when given, for later calls'
    --ckpt); every variant loads it as a user's run would."""
    from transformers import AutoModelForImageTextToText

    ckpt = where or tempfile.mkdtemp(prefix=f"qwen25vl-{size}-")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(DEV):
        m = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16 if CUDA else torch.float32)
    m.save_pretrained(ckpt)
    del m
    free()
    print(f"random-init {size} saved in {time.perf_counter() - t0:.0f}s", flush=True)
    return ckpt


def run_isolated(v: dict, args, ckpt: str, out: Path) -> dict:
    """One variant in a fresh Python process (same checkpoint, same samples: they are drawn from a fixed seed);
    its row, or an error row naming the exit status and the end of its log."""
    import subprocess

    sub = out / "isolated" / f"{v['name']}_r{v['round']}"
    sub.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--size", args.size, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--samples", str(args.samples), "--variants", v["name"], "--ckpt", ckpt, "--no-numerics", "--out", str(sub)]
    if args.data:
        cmd += ["--data", args.data]
    if v.get("profile"):
        cmd += ["--profile", v["name"]]
    t0 = time.perf_counter()
    with open(sub / "log.txt", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        row = json.loads((sub / f"train_speed_{args.size}.json").read_text())["variants"][0]
    except (OSError, ValueError, IndexError, KeyError):
        tail = (sub / "log.txt").read_text(errors="replace")[-600:]
        row = {"name": v["name"], "desc": v["desc"], "error": f"exit {rc}: {tail}"}
    # the process's log beside the results, one level down: the device tool returns files no deeper than that
    log_text = (sub / "log.txt").read_text(errors="replace")
    (out / f"log_{v['name']}_r{v['round']}.txt").write_text(
        "".join(line for line in log_text.splitlines(keepends=True) if "Loading weights" not in line))
    row = {**row, "round": v["round"], "isolated": True, "process_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="3b", choices=["tiny", "3b", "7b"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--variants", default="all")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--no-numerics", action="store_true")
    ap.add_argument("--profile", default="", help="variants (comma-separated names, or 'all') to profile with "
                                                 "torch.profiler over the warm-up's last optimizer step")
    ap.add_argument("--sync-audit", action="store_true",
                    help="count the host-GPU synchronisations of one micro-step per variant, by call site")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the chosen variants this many rounds, interleaved (A B A B ...); the table gives each "
                         "variant's median and range, so run-to-run drift is visible and shared")
    ap.add_argument("--isolate", action="store_true",
                    help="run each variant (and round) in a process of its own, as `qwenvl-tune train` runs one "
                         "recipe per process: no compiled graphs, allocator state, Python heap or Liger patches "
                         "carried over from the variants before it; the checkpoint and samples are the same")
    ap.add_argument("--data", default="", help="train on this data folder's documents (its train split, encoded "
                                               "as `qwenvl-tune train` encodes them) instead of drawn samples; "
                                               "needs --ckpt with a processor saved beside the model")
    ap.add_argument("--ckpt", default="", help="where the random-init checkpoint is, or is to be saved (a folder "
                                               "holding one already skips building it)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.size == "tiny"
    cfg = model_config(args.size)
    if args.data:  # a data folder's documents, with the token ids of the checkpoint that reads them
        from transformers import AutoConfig

        if not (Path(args.ckpt) / "config.json").is_file():
            ap.error("--data needs --ckpt: a saved checkpoint with its processor (bench/train_command.py builds one)")
        cfg = AutoConfig.from_pretrained(args.ckpt)
        samples = data_samples(args.data, args.ckpt, args.samples, 1280 * 28 * 28 if not tiny else 64 * 28 * 28)
    else:
        samples = make_samples(args.samples, 0, 1280 * 28 * 28 if not tiny else 64 * 28 * 28, tiny)
    info = env_info()
    info.update(size=args.size, mean_seq=sum(len(s.input_ids) for s in samples) / len(samples),
                mean_image_tokens=sum(s.image_tokens for s in samples) / len(samples),
                mean_answer_tokens=sum(s.answer_tokens for s in samples) / len(samples))
    print(json.dumps(info), flush=True)
    ckpt = args.ckpt if (Path(args.ckpt) / "config.json").is_file() else save_random_checkpoint(cfg, args.size, args.ckpt)
    # --variants none: only the numerics check
    chosen = chosen_variants(args.variants)
    profiled = set(args.profile.split(",")) if args.profile else set()
    chosen = [{**v, "profile": "all" in profiled or v["name"] in profiled, "sync_audit": args.sync_audit}
              for v in chosen]
    if args.repeat > 1 and not args.isolate and len({v.get("kernels", "none") for v in chosen}) > 1:
        # Liger patches classes process-wide: a later round's plain variants would run patched.
        ap.error("--repeat needs variants that all use the same model.kernels")
    chosen = [{**v, "round": r} for r in range(args.repeat) for v in chosen]
    results = {"env": info, "variants": []}
    if args.isolate:
        info["isolated"] = True
        if args.repeat > 1 and not args.no_numerics:
            ap.error("--isolate with --repeat: add --no-numerics (the check would run in the first process only)")
    if not args.no_numerics:
        try:
            results["numerics"] = numerics_check(ckpt, cfg, samples)
            print("numerics", results["numerics"], flush=True)
        except Exception as e:  # noqa: BLE001
            results["numerics"] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        (out / f"train_speed_{args.size}.json").write_text(json.dumps(results, indent=2))
    by_pages = {1: samples}
    for v in chosen:
        pages = v.get("pages", 1)
        if pages not in by_pages:
            by_pages[pages] = make_samples(args.samples, 0, 1280 * 28 * 28 if not tiny else 64 * 28 * 28, tiny, pages)
            results["env"][f"mean_seq_{pages}_pages"] = sum(len(s.input_ids) for s in by_pages[pages]) / args.samples
        if args.isolate:
            r = run_isolated(v, args, ckpt, out)
            results["variants"].append(r)
            (out / f"train_speed_{args.size}.json").write_text(json.dumps(results, indent=2))
            continue
        try:
            runner = run_trl if v.get("trl") else run_variant
            if v.get("trl"):  # TRL counts optimizer steps: the micro-batch counts of the others, divided
                accum = max(1, 8 // v["batch"])
                steps, warm = max(1, args.steps // accum), max(1, args.warmup // accum)
            else:
                steps, warm = args.steps, args.warmup
            r = {**runner(v, ckpt, cfg, by_pages[pages], steps, warm), "round": v["round"], "pages": pages}
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' numbers
            traceback.print_exc()
            r = {"name": v["name"], "desc": v["desc"], "error": f"{type(e).__name__}: {str(e)[:300]}"}
            free()
        results["variants"].append(r)
        print(json.dumps(r), flush=True)
        (out / f"train_speed_{args.size}.json").write_text(json.dumps(results, indent=2))
    base = next((r for r in results["variants"] if r["name"] == "guide_qlora_as_written" and "error" not in r), None)
    table = summary_table(results["variants"], base, args.size)
    (out / f"train_speed_{args.size}.md").write_text(f"# Training speed, {args.size}\n\n{json.dumps(info)}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
