"""The deployed quantizer `bbkernels::qdq`: its C++ and Triton kernels equal the ATen implementation bit for bit, ties
and extremes included, and it is what ONNX QuantizeLinear → DequantizeLinear computes (onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bbkernels
from bbkernels import cpu, triton_kernels
from bbkernels.deployed import qdq, qdq_reference


def near_ties(g: bbkernels.Grid, n: int, seed: int = 0) -> torch.Tensor:
    """Values at, just above and just below half-steps of the grid, past both bounds, and random ones; plus NaN."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = g.codes
    k = torch.randint(lo - 2, hi + 2, (n,), generator=gen).float()
    ties = (k + 0.5) * g.scale
    return torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                      torch.randn(n, generator=gen) * g.hi, torch.tensor([float("nan"), g.lo, g.hi])])


GRIDS = [bbkernels.grid(x_max, bits, signed) for x_max in (0.6, 1.37) for bits in (2, 4, 8, 16) for signed in
         (False, True)]


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: f"{g.bits}b-{g.lo < 0}-{g.hi:.3g}")
def test_kernels_equal_the_reference(g: bbkernels.Grid) -> None:
    x = near_ties(g, 2000)
    expected = qdq_reference(x, g.scale, g.lo, g.hi)
    assert bool(expected[-3].isnan())
    if cpu.available():
        got = qdq(x, g.scale, g.lo, g.hi)  # the op's CPU kernel
        assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    if triton_kernels.available():
        got = triton_kernels.qdq(x, g.scale, g.lo, g.hi)
        assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    codes = torch.round(expected[~expected.isnan()] / g.scale)
    assert float(codes.min()) == g.codes[0] and float(codes.max()) == g.codes[1]


def test_reference_is_onnx_quantize_dequantize() -> None:
    """QuantizeLinear divides by the scale and rounds half to even: the reference's arithmetic, tie for tie."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    g = bbkernels.grid(1.37, 8, False)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array(g.scale, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = near_ties(g, 5000)[:-3]  # no NaN: QuantizeLinear's NaN is implementation-defined
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert onnx.checker.check_model(model) is None
    assert torch.equal(torch.from_numpy(got), qdq_reference(x, g.scale, g.lo, g.hi))


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 500)], ids=["per-axis", "float-form"])
@pytest.mark.parametrize("g", [bbkernels.grid(1.37, 8, False), bbkernels.grid(0.6, 4, True),
                               bbkernels.grid(0.6, 16, True)], ids=lambda g: f"{g.bits}b-{g.lo < 0}")
def test_onnx_translation_is_the_reference(shape: tuple[int, ...], g: bbkernels.Grid) -> None:
    """The export's translation of `qdq`, per-axis Q/DQ where each scale entry covers 64 values or more, else the
    float form Clip → Div → Round → Mul, computes the reference in a default onnxruntime session, tie for tie."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from bayesian_bits.export.onnx import qdq_axis, run_onnxruntime, to_onnx

    class Quantize(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return qdq(x, g.scale, g.lo, g.hi)

    values = near_ties(g, int(np.prod(shape)))[:-3]  # no NaN: QuantizeLinear's NaN is implementation-defined
    x = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(1))][:int(np.prod(shape))]
    x = x.reshape(shape)
    proto = to_onnx(Quantize(), x, "qdq")
    ops = {n.op_type for n in proto.graph.node}
    assert ("QuantizeLinear" in ops) == (qdq_axis(shape) is not None) != ("Round" in ops)
    assert torch.equal(run_onnxruntime(proto, x), qdq_reference(x, g.scale, g.lo, g.hi))
