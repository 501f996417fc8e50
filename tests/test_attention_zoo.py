"""`prepare` on attention models: torchvision, timm and Hugging Face transformers and custom attention blocks.

Each is prepared, calibrated and trained three steps; every conv, linear and matmul (both of attention's) is a
quantized row of the BOP report whose MACs add up to torch's flop counter; the pruned export equals the eval model,
and its ONNX graph in a default onnxruntime session computes the pruned model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import bayesian_bits as bb
from bayesian_bits.export import export_model, load_pruned
from bayesian_bits.layers import QuantLayer
from tests.attention_zoo import ZOO, build, logits
from tests.checks import ZOO_CONFIG, assert_onnx_deploys, flop_counter_macs, full_precision, randomize_gates

pytest.importorskip("timm")
pytest.importorskip("transformers")


def _loss(out: object) -> torch.Tensor:
    """Cross-entropy against fixed labels, over every position of a language model's logits."""
    z = logits(out)
    z = z.reshape(-1, z.shape[-1])
    return F.cross_entropy(z, torch.arange(len(z)) % z.shape[-1])


@pytest.mark.parametrize("name", list(ZOO))
def test_attention_model_trains_counts_and_exports(name, tmp_path, one_thread):
    float_model, x = build(name)
    model = bb.prepare(float_model, x[:1], ZOO_CONFIG)
    torch.manual_seed(0)
    bb.calibrate(model, x)
    bb.assign_macs(model)

    report = bb.bop_report(model)
    assert report["total_macs"] == flop_counter_macs(float_model, x[:1])
    floats = [r["name"] for r in report["layers"] if "float" in (r["input_bits"], r["weight_bits"])]
    assert not floats, f"left float: {floats}"
    assert not unfolded_batch_norms(model)  # timm's BatchNormAct2d too
    matmuls = [r for r in report["layers"] if r["weight"] is None]  # activation × activation products
    attention = name not in ("timm_convnext_atto", "timm_mobilenetv3_small")
    assert len(matmuls) >= 2 * attention

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        (_loss(model(x)) + 0.01 * bb.regularizer(model)).backward()
        for n, p in model.named_parameters():
            if "gamma_" in n or "x_max" in n:
                assert p.grad is not None and bool(torch.isfinite(p.grad).all()), n
        optimizer.step()

    # Mixed bit widths, nothing pruned: the export replays every quantizer bit for bit.
    randomize_gates(model, prune=False)
    assert torch.equal(*pruned_and_eval(model, float_model, x, tmp_path))
    # Pruned channels at full precision: removed and carried exactly, up to fp32 summation order. (Pruned and
    # quantized, a changed summation order moves an activation at a rounding tie one grid step, which the next
    # attention spreads over the whole sample: tests/test_prepare.py checks that case on the CNN zoo.)
    randomize_gates(model)
    assert_onnx_deploys(model, x)
    full_precision(model)
    out, ref = pruned_and_eval(model, float_model, x, tmp_path)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def pruned_and_eval(model: torch.nn.Module, float_model: torch.nn.Module, x: torch.Tensor, tmp_path: Path
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the pruned export (loaded into a fresh prepare of the float model) and of the eval model."""
    model.eval()
    with torch.no_grad():
        ref = logits(model(x))
    assert torch.isfinite(ref).all()
    export_model(model, "pruned", tmp_path / "m.pruned")
    pruned = load_pruned(tmp_path / "m.pruned", skeleton=bb.prepare(float_model, x[:1], ZOO_CONFIG))
    with torch.no_grad():
        return logits(pruned(x)), ref


def unfolded_batch_norms(model: torch.fx.GraphModule) -> list[str]:
    """BatchNorms left as modules although their input is a layer's output and nothing else's (a BN in front of a
    block, as in MaxViT's MBConv, has nothing to fold into)."""
    def call(node: torch.fx.Node, kind: type) -> bool:
        return node.op == "call_module" and isinstance(model.get_submodule(node.target), kind)

    return [n.target for n in model.graph.nodes if call(n, _BatchNorm) and call(n.args[0], QuantLayer)
            and len(n.args[0].users) == 1]
