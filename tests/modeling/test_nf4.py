"""QLoRA's 4-bit products unpacked with tensor operations inside the compiled layers (``modeling/nf4.py``): the same
weights as bitsandbytes' own dequantisation, bit for bit, and the same loss and gradients as its operators, with none
of them left in the compiled graphs."""

from __future__ import annotations

import pytest
import torch

from qwenvl_tune.modeling import compiled as fcompiled
from qwenvl_tune.modeling import nf4

bnb = pytest.importorskip("bitsandbytes")
BNB_OP = "torch.ops.bitsandbytes."  # a bitsandbytes operator called from a graph


def _quantized(rows: int, cols: int, quant_type: str, nested: bool, storage: torch.dtype, dtype: torch.dtype):
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.02
    w[0, :64] = 0.0  # a block of zeros (scale 0)
    w[1, 5] = 3.0  # an outlier that sets its block's scale
    p = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                          quant_storage=storage)
    return p._quantize("cpu")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("shape", [(64, 2048), (48, 320)])  # 2,048 blocks; 240 blocks (a part group of 256)
def test_unpacked_weight_equals_bitsandbytes_dequantisation_bit_for_bit(quant_type, nested, storage, shape):
    import bitsandbytes.functional as bf

    for dtype in (torch.bfloat16, torch.float32):
        p = _quantized(*shape, quant_type, nested, storage, dtype)
        assert p.quant_state.nested == nested and nf4.eligible(p)
        want = bf.dequantize_4bit(p.data, p.quant_state)
        got = nf4.dequantize(p)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape == shape
        assert torch.equal(got, want)
        assert torch.count_nonzero(got[0, :64]) == 0


def test_layouts_it_does_not_unpack_are_left_to_bitsandbytes():
    p = _quantized(8, 128, "nf4", True, torch.bfloat16, torch.bfloat16)  # rows of 2 blocks of 64
    assert nf4.eligible(p)
    p.quant_state.blocksize = 256  # a block would straddle two rows
    assert not nf4.eligible(p)
    short = _quantized(60, 32, "nf4", True, torch.bfloat16, torch.bfloat16)  # rows of half a block
    assert not nf4.eligible(short)
    layer = bnb.nn.Linear4bit(32, 60, bias=False, quant_type="nf4")
    layer.weight = short
    assert nf4.make_compilable(torch.nn.Sequential(layer)) == 0 and type(layer) is bnb.nn.Linear4bit
    # unpacked over the flat layout the quantiser wrote, such a weight is still the weight (NF4's error, ~9%)
    ref = (torch.randn(60, 32, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16().float()
    p = bnb.nn.Params4bit(ref.bfloat16(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                          quant_storage=torch.bfloat16)._quantize("cpu")
    assert (nf4.dequantize(p).float() - ref).norm() / ref.norm() < 0.11
    assert not nf4.eligible(torch.nn.Parameter(torch.zeros(2, 2)))  # no quantisation state


def test_product_and_its_input_gradient_equal_bitsandbytes_layer_in_and_out_of_a_graph():
    layer = bnb.nn.Linear4bit(256, 96, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True, quant_storage=torch.bfloat16)
    torch.manual_seed(0)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 256) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, quant_storage=torch.bfloat16)._quantize("cpu")
    layer.bias = torch.nn.Parameter(torch.randn(96), requires_grad=False)
    x = torch.randn(2, 5, 256, requires_grad=True)

    def run(fn):
        x.grad = None
        out = fn(x)
        out.float().pow(2).sum().backward()
        return out.detach(), x.grad.clone()

    want = run(layer)
    got_eager = run(lambda t: nf4.product(layer, t))
    assert torch.equal(want[0], got_eager[0]) and torch.equal(want[1], got_eager[1])

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    torch._dynamo.reset()
    run(torch.compile(layer, backend=backend, fullgraph=True))  # as it was: bitsandbytes' operator in the graph
    assert len(graphs) == 1 and BNB_OP in graphs[0]
    assert nf4.make_compilable(torch.nn.Sequential(layer)) == 1 and isinstance(layer, bnb.nn.Linear4bit)
    torch._dynamo.reset()
    got = run(torch.compile(layer, backend=backend, fullgraph=True))
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert len(graphs) == 2 and BNB_OP not in graphs[1] and "tag_activation_checkpoint" in graphs[1]
    assert torch.equal(run(layer)[0], want[0])  # eager calls keep bitsandbytes' operator
    with torch.no_grad():  # inference graphs (a frozen tower's compiled blocks): the same product
        torch._dynamo.reset()
        assert torch.equal(torch.compile(layer, backend="aot_eager")(x), want[0])
    import pickle

    assert pickle.loads(pickle.dumps(type(layer))) is type(layer)  # importable by name
    torch._dynamo.reset()


def test_compiled_qlora_layers_unpack_4bit_in_graph_with_the_eager_loss_and_gradients(sample_data, tmp_path,
                                                                                      monkeypatch):
    """The decoder layers of a QLoRA model, compiled (graph capture and Inductor's autograd split and partitioner
    on a CPU): the loss and LoRA gradients of bitsandbytes' eager operators bit for bit, one set of graphs shared by
    the layers and by every later length, no bitsandbytes operator inside them, and no unpacked weight kept for
    the backward pass (the partitioner saved every one, +5.2 GiB at 3B on an H200, until the unpacking was marked
    for recomputation)."""
    from conftest import step_loss_and_grads, tiny_overrides
    from qwenvl_tune.config import build_config
    from qwenvl_tune.data.check import check_split
    from qwenvl_tune.data.collate import RecordDataset, TrainCollator
    from qwenvl_tune.modeling.fastpath import FastPath
    from qwenvl_tune.modeling.load import load_base_model, load_processor, prepare_for_training
    from qwenvl_tune.modeling.tiny import build_tiny_checkpoint
    from qwenvl_tune.training.setup import _encoder_and_vision
    from qwenvl_tune.training.step import TrainStep

    graphs, partitioner = [], ["aot_eager"]  # eager kernels; then Inductor's decompositions and partitioner

    def backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        from torch._dynamo.backends import debugging

        return getattr(debugging, partitioner[0])(gm, example_inputs)

    monkeypatch.setattr(fcompiled, "BACKEND", backend)
    torch._dynamo.reset()
    tiny_dir = build_tiny_checkpoint(tmp_path / "tiny4", layers=4)
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "model.compile": "on", "model.method": "qlora", "model.dtype": "bfloat16", "train.image_cache_gib": 0,
        "lora.target_modules": "q_proj,v_proj"}))
    proc = load_processor(tiny_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    torch.manual_seed(0)
    base = load_base_model(cfg.model)
    fast = FastPath.resolve(cfg.model, base.config, cuda=False)
    assert fast.compile_layers and fast.compiled_4bit
    model = prepare_for_training(base, cfg, fast).train()
    in_layers = [m for layer in fcompiled.decoder_layers(model) for m in layer.modules()
                 if isinstance(m, bnb.nn.Linear4bit)]
    assert len(in_layers) == 4 * 7 and all(type(m).__name__ == "CompilableLinear4bit" for m in in_layers)
    enc, vision = _encoder_and_vision(cfg, proc, fast)
    rows = RecordDataset(check_split(sample_data, "train").records, enc, "train")
    collate = TrainCollator(enc.pad_id, vision)

    compiled = TrainStep(model, fast)
    eager = TrainStep(model, fast.replace(compile_layers=False))
    weights = {tuple(m.weight.quant_state.shape) for m in in_layers}
    saved = []

    def keep(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    seen = []
    for i in (0, 2, 4):
        batch = collate([rows[i], rows[i + 1]])
        seen.append(batch["input_ids"].shape[1])
        want, got = step_loss_and_grads(eager, batch), step_loss_and_grads(compiled, batch)
        assert torch.equal(want[0], got[0]), (want[0], got[0])
        assert want[1].keys() == got[1].keys() and len(want[1]) > 4
        assert all(torch.equal(want[1][n], got[1][n]) for n in want[1]), \
            [n for n in want[1] if not torch.equal(want[1][n], got[1][n])]
    assert graphs, "the compiled layers ran"
    assert not any(BNB_OP in g for g in graphs)
    assert any("tag_activation_checkpoint" in g for g in graphs), "the 4-bit products are in the graphs"
    # three lengths, four layers: an exact-shape graph and a symbolic one for the first layer (its input has no
    # gradient) and for the other three together; a graph per layer (guards on each layer's 4-bit state) is >= 8
    assert len(set(seen)) == 3 and len(fcompiled.decoder_layers(model)) == 4
    assert len(graphs) <= 4, len(graphs)

    # what the compiled graphs keep for the backward pass, split as Inductor splits them
    partitioner[0] = "aot_eager_decomp_partition"
    torch._dynamo.reset()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        step_loss_and_grads(TrainStep(model, fast), collate([rows[0], rows[1]]))
    assert len(graphs) > 4 and saved
    assert not [s for s in saved if s[0] in weights and s[1] == torch.bfloat16], "an unpacked weight was saved"
    torch._dynamo.reset()
