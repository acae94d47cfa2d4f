"""The fast training path as one resolved object: a flag per trick, decided once, said aloud.

    fast = FastPath.resolve(config.model, model.config, train_vision=False, fsdp=False, autocast=True)
    print(fast.describe())          # which tricks are on, and why any is off
    model = prepare_for_training(model, config, fast)   # applies the model-side tricks
    with fast.training(model):      # the scoped ones (SDPA backends, LoRA input dtype), restored after
        ...

Each trick computes the plain path's numbers with less waste (equivalence tests in tests/modeling):

- ``vision_varlen``: the vision tower's window attention in one variable-length kernel (``attention.py``);
- ``align_vision_mlp``: Qwen2.5-VL's 3420-wide frozen vision MLP zero-padded to 3424 (``align.py``);
- ``loader_indices``: rope position ids and the vision tower's indices come from the data loader
  (``data/positions.py``), so the step does not wait for the GPU to compute them;
- ``answer_only_loss`` / ``chunked_loss``: logits only for answer tokens, in recomputed chunks (``loss.py``);
- ``lora_bf16_inputs``: under autocast, LoRA branches take the bf16 input instead of PEFT's float32 copy
  (PEFT's own ``disable_input_dtype_casting``);
- ``flash_sdpa``: PyTorch's cuDNN attention backend (high host cost per call) stays out of training;
- ``kernels``: liger-kernel's fused Triton kernels (``kernels.py``), with ``liger_rms_norm`` separately;
- ``native_rms_norm``: PyTorch's fused CUDA RMSNorm in place of the library's (and of Liger's) (``kernels.py``);
- ``frozen_vision_attention``: a frozen tower's attention as one module: qkv, rotary (Liger's kernel with
  ``kernels: liger``), one varlen call, proj (``attention.py``);
- ``compile_layers``: the language model's decoder layers through ``torch.compile`` while training
  (``compiled.py``); Liger's SwiGLU and rotary then stay out of them (``liger_language_model``), as Inductor
  fuses that element-wise work itself; ``compile_vision``: a frozen tower's blocks too;
- ``compiled_4bit``: QLoRA's 4-bit products unpacked with tensor operations inside the compiled layers, where
  Inductor fuses them, instead of bitsandbytes' host-heavy operators (``nf4.py``).

Benchmarks ablate a trick by ``fast.replace(align_vision_mlp=False)``; nothing is patched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..config import ModelConfig

# families whose vision MLP width is not a multiple of 8 at the published sizes (others need no padding)
ALIGNED_FAMILIES_TO_PAD = ("qwen2_5_vl",)


@dataclass(frozen=True)
class FastPath:
    vision_varlen: bool = True
    align_vision_mlp: bool = True
    loader_indices: bool = True
    answer_only_loss: bool = True
    chunked_loss: bool = True
    lora_bf16_inputs: bool = True
    flash_sdpa: bool = True
    kernels: str = "none"  # "liger" or "none", resolved
    liger_rms_norm: bool = True
    native_rms_norm: bool = False
    frozen_vision_attention: bool = True
    compile_layers: bool = False
    compile_vision: bool = False  # a frozen tower's blocks compiled too (with compile_layers)
    liger_language_model: bool = True  # Liger's SwiGLU and rotary in the language model (off when it is compiled)
    compiled_4bit: bool = False  # QLoRA's products traceable inside the compiled layers
    notes: tuple[str, ...] = ()  # why a trick that could apply is off

    @classmethod
    def off(cls, kernels: str = "none") -> "FastPath":
        """The plain path (``model.fast_path=false``); fused kernels are a separate choice (``model.kernels``)."""
        return cls(vision_varlen=False, align_vision_mlp=False, loader_indices=False, answer_only_loss=False,
                   chunked_loss=False, lora_bf16_inputs=False, flash_sdpa=False, kernels=kernels,
                   frozen_vision_attention=False)

    @classmethod
    def resolve(cls, model_cfg: ModelConfig, hf_config: Any, *, train_vision: bool | None = None, fsdp: bool = False,
                autocast: bool = False, cuda: bool | None = None) -> "FastPath":
        """Decide every flag from the model settings, the checkpoint's config and how training runs."""
        from ..data.positions import VisionIndex
        from .kernels import native_rms_norm_available, resolve_kernels

        cuda = torch.cuda.is_available() if cuda is None else cuda
        train_vision = model_cfg.train_vision if train_vision is None else train_vision
        kernels, kernel_note = resolve_kernels(model_cfg.kernels, getattr(hf_config, "model_type", None), cuda)
        notes = [f"kernels: {kernels} ({kernel_note})"]
        if not model_cfg.fast_path:
            return dataclasses.replace(cls.off(kernels), notes=tuple(notes + ["model.fast_path=false"]))
        align = True
        if model_cfg.method == "qlora":
            align, _ = False, notes.append("vision MLP not padded: its layers are 4-bit (QLoRA)")
        elif train_vision:
            align, _ = False, notes.append("vision MLP not padded: the tower is trained (its shapes stay published)")
        elif fsdp:
            align, _ = False, notes.append("vision MLP not padded: FSDP shards the published shapes")
        loader = VisionIndex.for_config(hf_config) is not None
        if not loader:
            notes.append("vision indices computed by the model: this transformers' tower does not read the loader's")
        if not autocast and model_cfg.method != "full":
            notes.append("LoRA inputs keep PEFT's cast: no autocast (mixed precision) to make it redundant")
        if fsdp:
            notes.append("loss not chunked: FSDP's root does not allow calling the head outside its forward")
        compile_layers = model_cfg.compile == "on" or (model_cfg.compile == "auto" and cuda)
        if compile_layers and model_cfg.gradient_checkpointing:
            compile_layers = False
            notes.append("decoder layers not compiled: gradient checkpointing recomputes them eagerly")
        elif compile_layers and fsdp:
            compile_layers = False
            notes.append("decoder layers not compiled: FSDP wraps them")
        elif model_cfg.compile == "auto" and not cuda:
            notes.append("decoder layers not compiled: no CUDA GPU (model.compile=on compiles on a CPU too)")
        compile_vision = compile_layers and not train_vision and model_cfg.method != "qlora"
        if compile_layers and not train_vision and not compile_vision:
            notes.append("vision blocks not compiled: with 4-bit (QLoRA) layers, compiled blocks were slower on an "
                         "H200 (8.4 against 9.7 samples/s, 3B, bench/results/LOG.md 2026-12-03)")
        if compile_layers:
            notes.append("decoder layers" + (" and the frozen vision tower's blocks" if compile_vision else "")
                         + " compiled by torch.compile for training: the first batches of new shapes take longer "
                         "(model.compile=off to skip)")
        native = cuda and native_rms_norm_available()
        if cuda and not native:
            notes.append("RMSNorm not fused by PyTorch: this PyTorch has no fused CUDA kernel (2.8 or later has)")
        return cls(align_vision_mlp=align, loader_indices=loader, chunked_loss=not fsdp, lora_bf16_inputs=autocast,
                   flash_sdpa=cuda, kernels=kernels, native_rms_norm=native, frozen_vision_attention=not train_vision,
                   compile_layers=compile_layers, compile_vision=compile_vision,
                   liger_language_model=not compile_layers, compiled_4bit=compile_layers and model_cfg.method == "qlora",
                   notes=tuple(notes))

    def replace(self, **flags: Any) -> "FastPath":
        return dataclasses.replace(self, **flags)

    def describe(self) -> str:
        on = [f.name for f in dataclasses.fields(self)
              if f.type in (bool, "bool") and getattr(self, f.name)
              and f.name not in ("liger_rms_norm", "liger_language_model")]
        return f"fast path: {', '.join(on) or 'off'}" + "".join(f"\n  {n}" for n in self.notes)

    # ---- applying it
    def apply(self, model: torch.nn.Module) -> list[str]:
        """The model-side tricks, on a loaded model before adapters are attached. Returns what was done,
        including a line for a trick that should have applied and found nothing to act on."""
        from .align import ALIGN, align_vision_mlp, vision_mlp_widths
        from .attention import enable_fast_vision_attention
        from .attention import swap_frozen_vision_attention
        from .kernels import apply_kernels, use_fused_rms_norm

        done = []
        if self.kernels != "none":
            liger_norm = self.liger_rms_norm and not self.native_rms_norm
            lm = self.liger_language_model
            apply_kernels(model, self.kernels, rms_norm=liger_norm, language_model=lm, vision=not self.compile_vision)
            left = [n for n, on in (("its RMSNorm", liger_norm), ("its language-model SwiGLU and rotary", lm)) if not on]
            done.append(f"kernels: {self.kernels}" + (f" (without {' or '.join(left)})" if left else ""))
        if self.native_rms_norm:
            done.append(f"RMSNorm: {use_fused_rms_norm(model)} modules on PyTorch's fused kernel")
        if self.vision_varlen:
            done.append("vision attention: one varlen kernel" if enable_fast_vision_attention(model)
                        else "vision attention: no vision tower found; left as it was")
            if self.frozen_vision_attention:
                # compiled blocks get the library's rotary, which Inductor fuses; else Liger's one-pass kernel
                rope = "liger" if self.kernels == "liger" and not self.compile_vision else "plain"
                n = swap_frozen_vision_attention(model, rope)
                liger = " (Liger rotary)" if rope == "liger" and n else ""
                done.append(f"vision attention: {n} frozen blocks as one module{liger}")
        if self.compile_layers:
            from .compiled import decoder_layers, vision_blocks

            vision = f" and {len(vision_blocks(model))} vision blocks" if self.compile_vision else ""
            done.append(f"language model: {len(decoder_layers(model))} decoder layers{vision} compiled for training "
                        f"(torch.compile; the first batches of new shapes take a while to compile)")
        if self.compiled_4bit:
            from .nf4 import make_compilable

            done.append(f"4-bit products: {make_compilable(model)} layers unpacked by tensor operations inside the "
                        f"compiled graphs (bitsandbytes' own operators elsewhere)")
        if self.align_vision_mlp:
            n = align_vision_mlp(model)
            family = getattr(getattr(model, "config", None), "model_type", None)
            widths = vision_mlp_widths(model)  # none recognised, or some left unaligned: a layout we do not know
            if n == 0 and family in ALIGNED_FAMILIES_TO_PAD and (not widths or any(w % ALIGN for w in widths)):
                done.append(f"warning: 0 vision MLPs padded in a {family} model: this transformers' MLP layout "
                            f"was not recognised, so its products run on slower kernels (about 8% of training speed)")
            else:
                done.append(f"vision MLP: {n} padded to a multiple of 8" if n else "vision MLP: already aligned")
        return done

    @contextlib.contextmanager
    def training(self, model: torch.nn.Module) -> Iterator[None]:
        """The process-wide and per-layer switches that hold while training, restored afterwards."""
        from .attention import flash_sdpa

        with contextlib.ExitStack() as stack:
            stack.enter_context(flash_sdpa(self.flash_sdpa))
            if self.lora_bf16_inputs and importlib.util.find_spec("peft") is not None:
                from peft.helpers import disable_input_dtype_casting

                stack.enter_context(disable_input_dtype_casting(model))
            yield
