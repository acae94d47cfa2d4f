"""One inference session: a run's model loaded once, ready to extract.

    predictor = Predictor.from_run("runs/NAME")                  # best/, decoding under the learnt schema
    rows = predictor.predict([image], ["extract data in JSON format"])   # a document: an image or a list of pages
    rows = predictor.predict([predictor.load_pages("invoice.pdf")])

``Predictor`` owns the model, the processor, the conversation encoder, the stop ids, the compiled
JSON constraint and the generation settings. ``api.predict``, ``api.evaluate``, bulk extraction and
every HTTP route use it, so they decode the same way and read the same limits from the run's config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..config import Config, ModelConfig
from ..data.collate import Encoder, GenerateCollator, Pages, RecordDataset, collate
from ..data.documents import PageLimits, load_files
from ..data.records import Record
from ..evaluation.metrics import parse_json
from ..modeling.generate import Generation, Sampling, generate, stop_token_ids
from ..modeling.load import DTYPES, load_base_model, load_processor
from ..rundir import SCHEMA_FILE, RunDir
from .confidence import confidence_of, review
from .structured import constraint_for


def extraction_result(text: str, truncated: bool) -> dict[str, Any]:
    """What predict, bulk extraction and the service return for one answer.

    An answer cut off by ``max_new_tokens`` is reported as truncated and never as valid, even when
    the text that was produced happens to parse.
    """
    ok, value = parse_json(text)
    ok = ok and not truncated
    return {"json": value if ok else None, "valid": ok, "output": text, "truncated": truncated}


def load_model(run: RunDir, which: str, *, base: bool = False, device: torch.device) -> torch.nn.Module:
    """The run's ``best``/``last`` model (or its base model) on ``device``, in eval mode."""
    from ..modeling.align import align_vision_mlp

    config = run.config
    mcfg: ModelConfig = config.model
    if device.type == "cpu" and mcfg.dtype != "float32":
        # bf16 matrix products on a CPU are slow and imprecise; inference there runs in float32
        mcfg = dataclasses.replace(mcfg, dtype="float32")
    if mcfg.method == "full" and not base:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(run.checkpoint(which), dtype=DTYPES[mcfg.dtype],
                                                            attn_implementation=mcfg.attn_implementation)
        align_vision_mlp(model)
    else:
        # A QLoRA run's base loads in 4 bits on a GPU, as it was trained, so a card that trained it can also
        # evaluate and serve it; generate.qlora_base=bf16 loads the unquantised base (what a merged export computes).
        four_bit = mcfg.method == "qlora" and config.generate.qlora_base == "4bit" and device.type == "cuda"
        model = load_base_model(mcfg, quantize=four_bit, device_map={"": device} if four_bit else None)
        if not four_bit and (base or not mcfg.train_vision):  # adapters on the tower need its published shapes
            align_vision_mlp(model)
        if not base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, run.checkpoint(which))
        if four_bit:
            return model.eval()  # already on its device; 4-bit weights are not moved
    return model.to(device).eval()


class Predictor:
    """A loaded model with everything needed to turn document images into JSON."""

    def __init__(self, model: Any, processor: Any, config: Config, *, schema: dict[str, Any] | None = None,
                 constrained: bool = True, name: str = "finetuned", run: RunDir | None = None,
                 schema_name: str = SCHEMA_FILE):
        self.model, self.processor, self.config, self.run, self.name = model, processor, config, run, name
        self.encoder = Encoder(processor, config.data.system_message)
        self.stop_ids = stop_token_ids(model, processor)
        self.schema, self.schema_name = schema, schema_name
        self.constraint = constraint_for(model, processor, schema) if constrained and schema is not None else None
        self.max_new_tokens = config.generate.max_new_tokens
        self.confidence = config.generate.confidence
        self.review_below = config.generate.review_below
        self.batch_size = config.generate.batch_size
        self.limits = PageLimits.from_config(config.data)
        self.max_image_pixels = self.limits.max_image_pixels
        self.default_prompt = config.data.prompt

    @classmethod
    def from_run(cls, run: str | Path | RunDir, checkpoint: str = "best", *, constrained: bool | None = None,
                 base: bool = False, device: str | torch.device | None = None) -> "Predictor":
        """Load ``best``/``last`` of a run folder (or, with ``base``, the model it was trained from).

        ``constrained`` (default: the run's ``generate.constrained``) decodes under the run's learnt
        answer schema; the base model is decoded the same way, so the two are compared like with like.
        """
        run = run if isinstance(run, RunDir) else RunDir.open(run)
        config = run.config
        ckpt = run.checkpoint(checkpoint)  # a clear error before any weights load
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        processor = load_processor(ckpt, config.data.min_pixels, config.data.max_pixels)
        model = load_model(run, checkpoint, base=base, device=device)
        constrained = config.generate.constrained if constrained is None else constrained
        return cls(model, processor, config, schema=run.schema(), constrained=constrained,
                   name="base" if base else "finetuned", run=run)

    # ---- what this session decodes with
    @property
    def constrained(self) -> bool:
        return self.constraint is not None

    @property
    def decoding(self) -> str:
        """How answers are decoded, for every label a user reads (columns, metrics.json, /health)."""
        return f"constrained to {self.schema_name}" if self.constrained else "unconstrained"

    def with_decoding(self, constrained: bool, name: str | None = None) -> "Predictor":
        """The same loaded model, decoding with or without the schema."""
        other = Predictor.__new__(Predictor)
        other.__dict__.update(self.__dict__)
        other.name = name or self.name
        other.constraint = (self.constraint or constraint_for(self.model, self.processor, self.schema)) \
            if constrained and self.schema is not None else None
        return other

    # ---- generation
    def generate(self, batch: dict[str, Any]) -> list[Generation]:
        """Answers for one left-padded batch, each with its token log-probabilities when confidences are on."""
        return generate(self.model, self.processor, batch, self.max_new_tokens, self.stop_ids, self.constraint,
                        logprobs=self.confidence)

    def output(self, gen: Generation) -> dict[str, Any]:
        """What evaluation stores of an answer: the raw text, whether it was cut off, and its confidences."""
        out: dict[str, Any] = {"raw": gen.text, "truncated": gen.truncated}
        if self.confidence:
            out["confidence"] = confidence_of(gen, self.processor.tokenizer)
        return out

    def generate_records(self, records: Sequence[Record], progress: bool = False) -> list[dict[str, Any]]:
        """Answers for dataset records (their pages and prompts), in order, as ``output`` dicts; ``progress``
        shows a bar with ETA."""
        from tqdm.auto import tqdm

        ds = RecordDataset(list(records), self.encoder, "generate", self.limits)
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False,
                                             collate_fn=GenerateCollator(self.encoder.pad_id), num_workers=0)
        out: list[dict[str, Any]] = []
        with tqdm(total=len(ds), desc=f"{self.name} ({self.decoding})", unit="doc", disable=not progress) as bar:
            for batch in loader:
                gens = self.generate(batch)
                out += [self.output(g) for g in gens]
                bar.update(len(gens))
        return out

    def generate_images(self, images: Sequence[Pages], prompts: Sequence[str | None] | None = None,
                        batch_size: int | None = None) -> list[Generation]:
        """Answers for loaded documents (each an image or a list of pages), ``batch_size`` (default: the run's)
        at a time."""
        prompts = list(prompts) if prompts is not None else [None] * len(images)
        size = batch_size or self.batch_size
        gens: list[Generation] = []
        for i in range(0, len(images), size):
            items = [self.encoder.encode_prompt(im, pr or self.default_prompt)
                     for im, pr in zip(images[i:i + size], prompts[i:i + size])]
            gens += self.generate(collate(items, self.encoder.pad_id, left=True))
        return gens

    def result(self, gen: Generation, pages: int = 1) -> dict[str, Any]:
        """What predict, bulk extraction and the service return for one answer (``extraction_result``), with
        per-field confidences and, under ``generate.review_below``, the review flags."""
        out = {**extraction_result(gen.text, gen.truncated), "pages": pages}
        if self.confidence:
            out["confidence"] = confidence_of(gen, self.processor.tokenizer)
            if self.review_below:
                out.update(review(out["confidence"], self.review_below))
        return out

    def encode(self, pages: Pages, prompt: str | None = None, system: str | None = None) -> dict[str, Any]:
        """The model inputs of one request: a document (an image or its pages), with a system message of its own
        if given."""
        return self.encoder.encode_prompt(pages, prompt or self.default_prompt, system=system)

    def complete(self, items: Sequence[dict[str, Any]], *, constraint: Any = "run", max_new_tokens: int | None = None,
                 sampling: Sampling | None = None, streamer: Any = None, logprobs: bool = False,
                 top_logprobs: int = 0) -> list[Generation]:
        """Generate for encoded requests (``encode``) as one batch, each with its finish reason and token counts.

        ``constraint``: "run" for the session's own (the learnt schema, if constrained), None for free decoding,
        or a compiled ``JsonConstraint`` (e.g. a caller's schema).
        """
        constraint = self.constraint if constraint == "run" else constraint
        batch = collate(list(items), self.encoder.pad_id, left=True)
        return generate(self.model, self.processor, batch, max_new_tokens or self.max_new_tokens, self.stop_ids,
                        constraint, sampling, streamer, logprobs, top_logprobs)

    def compile_schema(self, schema: dict[str, Any]) -> Any:
        """A caller's JSON Schema compiled for this model (raises on a schema the grammar compiler rejects)."""
        return constraint_for(self.model, self.processor, schema)

    def predict(self, images: Sequence[Pages], prompts: Sequence[str | None] | None = None,
                batch_size: int | None = None) -> list[dict[str, Any]]:
        """One result dict per document (an image or a list of pages): ``json``, ``valid``, ``output``,
        ``truncated``, ``pages``, ``confidence`` ({"document", "fields"}) and, with ``generate.review_below``,
        ``needs_review`` and ``review_fields``."""
        gens = self.generate_images(images, prompts, batch_size)
        pages = [1 if isinstance(d, Image.Image) else len(d) for d in images]
        return [self.result(g, n) for g, n in zip(gens, pages)]

    def load_pages(self, paths: str | Path | Sequence[str | Path]) -> list[Image.Image]:
        """A document's pages from its files (images, PDFs), under the run's limits (``data.max_image_pixels``,
        ``data.max_pages``; PDF pages rendered at ``data.max_pixels``)."""
        return load_files([paths] if isinstance(paths, (str, Path)) else list(paths), self.limits)

    def close(self) -> None:
        """Drop the model and hand cached GPU memory back (before loading the next one)."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
