"""FSDP pieces on CPU (2 gloo processes, plain torch FSDP; Lightning's FSDP itself needs GPUs and is
covered by the GPU tests): the wrap policy, and weights gathered whole and saved in the same format
as an unsharded save."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses and trained runs: tens of seconds on 2 CPU cores

FSDP_OK = dist.is_available() and dist.is_gloo_available()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Holder(torch.nn.Module):
    """Stands in for the LightningModule: the HF/PEFT model under ``.model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def _worker(rank: int, world: int, port: int, ckpt: str, method: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision

        from qwenvl_tune.config import build_config
        from qwenvl_tune.modeling.load import load_base_model, prepare_for_training
        from qwenvl_tune.training.distributed import NoSplitWrapPolicy, full_state_dict, save_weights

        cfg = build_config(None, {"model.name_or_path": ckpt, "model.method": method, "model.dtype": "bfloat16",
                                  "lora.target_modules": "all-linear"})
        torch.manual_seed(0)
        model = prepare_for_training(load_base_model(cfg.model), cfg)
        with torch.no_grad():  # adapters with values, so the comparison means something
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))).to(p.dtype) * 0.01)
        if rank == 0:
            save_weights(model, Path(out) / "plain")
        root = FSDP(_Holder(model), auto_wrap_policy=NoSplitWrapPolicy(), use_orig_params=True,
                    device_id=torch.device("cpu"),
                    mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
        units = [m.module for m in root.modules() if isinstance(m, FSDP) and m is not root]
        sd = full_state_dict(root, rank == 0, prefix="model.")
        if rank == 0:
            save_weights(model, Path(out) / "gathered", sd)
            (Path(out) / "units.txt").write_text("\n".join(
                f"{type(u).__name__} {next(u.parameters()).dtype}" for u in units))
    finally:
        dist.destroy_process_group()


LAYER_CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
                 "qwen2_vl": ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"),
                 "qwen3_vl": ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")}


@pytest.mark.skipif(not FSDP_OK, reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("family,method", [("qwen2_5_vl", "lora"), ("qwen2_5_vl", "full"), ("qwen2_vl", "lora"),
                                           ("qwen3_vl", "lora")])
def test_fsdp_gathered_save_equals_unsharded_save(family, method, tiny_family, tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _port(), str(tiny_family(family)), method, str(tmp_path)), nprocs=2)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    plain, gathered = load_file(tmp_path / "plain" / name), load_file(tmp_path / "gathered" / name)
    assert plain and plain.keys() == gathered.keys()
    for k in plain:
        assert torch.equal(plain[k], gathered[k]), k
    units = (tmp_path / "units.txt").read_text().splitlines()
    # one unit per decoder layer and vision block (the tiny models: 2 + 2)
    layer, block = LAYER_CLASSES[family]
    assert sum(u.startswith(layer + " ") for u in units) == 2
    assert sum(u.startswith(block + " ") for u in units) == 2
    if method == "lora":
        # float32 adapters on the bf16 base: units of their own (FSDP flattens one dtype per unit)
        assert any(u == "Linear torch.float32" for u in units)
        from peft import PeftConfig

        assert PeftConfig.from_pretrained(tmp_path / "gathered").inference_mode
