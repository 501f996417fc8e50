"""Checks shared by the model zoo tests: MACs by torch's flop counter, mixed gates, agreement up to rounding ties."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import bayesian_bits as bb
from bayesian_bits.quantizer import BayesianBitsQuantizer

ZOO_CONFIG = bb.QuantConfig(6, 6, -6, -6, include_pruning=True, reg_type="bop")  # the zoos' models: 8-bit at init


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs = FLOPs / 2 over convolutions and matrix products, by torch's own counter. Attention runs on SDPA's math
    backend: the counter has no formula for the fused CPU kernel (it would count it as 0), the math backend's two
    batched matmuls it counts."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.eval()(x)
    ops = ("convolution", "mm", "bmm")
    return sum(v for k, v in counter.get_flop_counts()["Global"].items() if any(o in str(k) for o in ops)) // 2


def randomize_gates(model: nn.Module, seed: int = 0, prune: bool = True) -> None:
    """Mixed eval bit widths (a third of the quantizers at 4 bits, the others at 8) and, with `prune`, about 16 % of
    the channels pruned."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in (m for m in model.modules() if isinstance(m, BayesianBitsQuantizer)):
            q.gamma_8.fill_(-6.0 if int(torch.randint(0, 3, (), generator=gen)) == 0 else 6.0)
            if q.gamma_2 is not None and prune:
                q.gamma_2.copy_(torch.randn(q.gamma_2.shape, generator=gen) * 2 + 2)


def full_precision(model: nn.Module) -> None:
    """Every quantizer's gates open up to 32 bits (float in eval); pruning gates as they are."""
    with torch.no_grad():
        for q in (m for m in model.modules() if isinstance(m, BayesianBitsQuantizer)):
            for gamma in (q.gamma_4, q.gamma_8, q.gamma_16, q.gamma_32):
                gamma.fill_(6.0)


def assert_agrees(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to fp32 precision but for rounding ties. The pruned model sums its inputs in another order than the
    eval model (removed channels carried as bias); now and then an activation lands a grid step apart, and in these
    deep untrained networks the layers after it spread that step through the sample's logits (a constant channel at
    a tie shifts every sample a little). A wrong graph is off by the logits' own scale on every sample; here many
    samples agree to a hundredth of it and the predictions almost always (BENCHMARKS.md has the figures)."""
    close = (got - ref).abs().amax(1) <= 1e-2 * float(ref.abs().max())
    assert float(close.float().mean()) >= 0.25, f"{int(close.sum())} of {len(close)} samples agree to 1 %"
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.75


class _QdqCalls(TorchDispatchMode):
    """Records every deployed quantizer call (``bbkernels::qdq``): its input, step and output, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, float, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.bbkernels.qdq.default:
            self.calls.append((args[0].clone(), args[1], out.clone()))  # the model may change them in place
        return out


def _quantizer_outputs(proto: object) -> tuple[object, list[str]]:
    """A copy of an ONNX graph that also outputs every activation quantizer (QuantizeLinear → DequantizeLinear, or
    the float form … → Round → Mul), and their names in graph order."""
    import onnx

    probe = copy.deepcopy(proto)
    quantized = {n.output[0]: n.op_type for n in probe.graph.node if n.op_type in ("QuantizeLinear", "Round")}
    last = {"QuantizeLinear": "DequantizeLinear", "Round": "Mul"}
    names = [n.output[0] for n in probe.graph.node if n.input and last.get(quantized.get(n.input[0])) == n.op_type]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return probe, names


def assert_deploys(forward: Callable[[torch.Tensor], torch.Tensor], proto: object, x: torch.Tensor) -> None:
    """The ONNX graph in a default onnxruntime session computes ``forward`` (the pruned PyTorch model, logits) on
    ``x``: logits within 1e-5 of max |logit| and the same predictions, unless onnxruntime's kernels (their summation
    order, exp, erf) put an activation on the other side of a rounding tie, which the layers after it spread. Then the
    first quantizer whose outputs differ must differ only there: by one grid step, at elements that PyTorch's input
    puts within 1e-3 steps of a tie (a wrong graph differs by more, or at many elements)."""
    from bayesian_bits.export.onnx import onnxruntime_session

    with torch.no_grad(), _QdqCalls() as recorded:
        ref = forward(x)
    got = torch.from_numpy(onnxruntime_session(proto).run(None, {"input": x.numpy()})[0])
    assert got.shape == ref.shape
    scale = max(float(ref.abs().max()), 1e-30)
    if float((got - ref).abs().max()) <= 1e-5 * scale and torch.equal(got.argmax(-1), ref.argmax(-1)):
        return
    probe, names = _quantizer_outputs(proto)
    probed = onnxruntime_session(probe).run(None, {"input": x.numpy()})
    assert torch.equal(torch.from_numpy(probed[0]), got)  # the probe outputs change nothing
    assert len(names) == len(recorded.calls), "the graph's quantizers are not the model's"
    for (inputs, step, expected), value in zip(recorded.calls, probed[1:], strict=True):
        value = torch.from_numpy(value)
        assert value.shape == expected.shape
        differ = value != expected
        if bool(differ.any()):
            assert int(differ.sum()) <= max(2, expected.numel() // 1000), f"{int(differ.sum())} elements differ"
            assert float((value - expected)[differ].abs().max()) <= 1.001 * step
            position = (inputs[differ] / step).double()
            assert float(((position - position.floor()) - 0.5).abs().max()) < 1e-3, "a difference away from a tie"
            return
    raise AssertionError(f"every quantizer agrees, yet the logits differ by {float((got - ref).abs().max()):.3g}")


def assert_onnx_deploys(model: nn.Module, x: torch.Tensor) -> None:
    """`assert_deploys` for the ONNX export of a prepared ``model`` (eval mode from here), on 8 inputs like ``x``."""
    from bayesian_bits.export import loaded_model, onnx_model
    from bayesian_bits.export.onnx import deployed_program
    from tests.attention_zoo import VOCAB, logits

    loaded = loaded_model(model.eval())
    pruned, proto = onnx_model(loaded)
    gen = torch.Generator().manual_seed(5)
    xs = torch.rand(8, *x.shape[1:], generator=gen) if x.is_floating_point() else \
        torch.randint(0, VOCAB, (8, *x.shape[1:]), generator=gen)
    with torch.no_grad():
        expected = logits(pruned(xs))
    program = deployed_program(pruned, loaded.example(2)).module()  # quantizers in the graph's order and places
    assert torch.equal(program(xs), expected)
    assert_deploys(program, proto, xs)
