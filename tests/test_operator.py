"""Every kernel backend against the pure-PyTorch reference (SPEC A4), plus the op's contract.

Fresh random inputs on every run. Kernel backends: the C++ CPU kernel, Triton (under the
interpreter on CPU tensors, small shapes), and on a GPU machine Triton and CUDA C++ on the device.
"""

from __future__ import annotations

import math

import pytest
import torch

import bbkernels
from bbkernels import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNELS = [(d, b) for d in DEVICES for b in bbkernels.available_backends(d) if b != "reference"]
KERNEL_IDS = [f"{d}-{b}" for d, b in KERNELS]
# The interpreter runs Triton programs in Python: keep its shapes small.
SLOW = {("cpu", "triton")}

SMALL_SHAPES = [(1,), (7, 3, 5, 5), (10, 24), (2, 3, 6, 5)]
LARGE_SHAPES = [(256, 4096), (1 << 20,)]  # 2^20 elements: a weight with g2, an activation without
DEPTH_GATES = {  # effective depth D → gates (g4, g8, g16, g32); the first zero ends the chain
    2: (0.0, 0.7, 0.4, 0.9),
    4: (0.6, 0.0, 0.5, 0.8),
    8: (0.9, 0.5, 0.0, 0.3),
    16: (0.3, 0.8, 0.6, 0.0),
    32: (0.7, 0.9, 0.2, 0.6),
}


def shapes_for(device: str, backend: str) -> list[tuple[int, ...]]:
    return SMALL_SHAPES if (device, backend) in SLOW else SMALL_SHAPES + LARGE_SHAPES


def make_inputs(shape, *, signed, gates, with_g2, device="cpu", dtype=torch.float32, zero_channels=True):
    """x with values exactly on the clip bounds planted, x_max, gates and an optional g2 with zeros."""
    x = torch.randn(shape) * 1.5
    if not signed:
        x = x.abs() * torch.where(torch.rand(shape) < 0.1, -1.0, 1.0)
    x_max = torch.tensor(1.0 + torch.rand(()).item() * 2)
    xm_shrunk = (x_max * torch.tensor(reference.SHRINK)).item()
    flat = x.view(-1)
    plant = [xm_shrunk, -xm_shrunk, x_max.item(), -x_max.item(), 0.0]
    for i, v in enumerate(plant[: flat.numel()]):
        flat[(i * 7919) % flat.numel()] = v
    g2 = None
    if with_g2:
        g2 = torch.rand(shape[0]) * 0.8 + 0.2
        if zero_channels and shape[0] > 2:
            g2[torch.randperm(shape[0])[: max(1, shape[0] // 4)]] = 0.0
    move = dict(device=device)
    return (
        x.to(dtype=dtype, **move),
        x_max.to(**move),
        torch.tensor(gates, **move),
        None if g2 is None else g2.to(**move),
    )


def run(fn, x, x_max, gates, g2, grad):
    """Output and gradients (x, x_max, gates, g2) of fn through autograd."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, x_max, gates, g2)]
    y = fn(*leaves)
    y.backward(grad.to(y.dtype))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def oracle_and_reference(x, x_max, gates, g2, grad, signed):
    ref = run(lambda *a: reference.bb_quantize(*a, signed=signed), x, x_max, gates, g2, grad)
    hi = run(
        lambda *a: reference.bb_quantize(*a, signed=signed, compute_dtype=torch.float64),
        x.double(),
        x_max.double(),
        gates.double(),
        None if g2 is None else g2.double(),
        grad.double(),
    )
    return ref, hi


def assert_a4(name, kernel, ref, hi, n_terms=1, term_scale=1.0):
    """SPEC A4: error against float64 at most twice the fp32 reference's, plus a rounding floor.

    The floor is a few fp32 ulps of the value for elementwise outputs. A reduction over n_terms
    terms of size ~term_scale also carries the fp32 rounding of its per-element terms, which the
    kernel and the reference share but may cancel differently: a random walk of 4·eps·√n·term_scale.
    """
    if kernel is None:
        assert ref is None
        return
    assert not torch.isnan(kernel).any(), f"{name}: NaN"
    k, r, h = kernel.double().cpu().reshape(-1), ref.double().cpu().reshape(-1), hi.double().cpu().reshape(-1)
    eps = torch.finfo(torch.float32).eps
    floor = 4 * eps * (h.abs().max().item() + 1.0) + 4 * eps * math.sqrt(n_terms) * term_scale
    err_k, err_r = (k - h).abs().max().item(), (r - h).abs().max().item()
    assert err_k <= 2 * err_r + floor, f"{name}: {err_k} vs ref {err_r} (floor {floor})"


def check_against_reference(device, backend, shape, signed, gates, with_g2, dtype=torch.float32):
    x, x_max, g, g2 = make_inputs(shape, signed=signed, gates=gates, with_g2=with_g2, device=device, dtype=dtype)
    grad = torch.randn(shape, device=device)
    out = run(lambda *a: bbkernels.bb_quantize(*a, signed=signed, backend=backend), x, x_max, g, g2, grad)
    ref, hi = oracle_and_reference(x.cpu(), x_max.cpu(), g.cpu(), None if g2 is None else g2.cpu(), grad.cpu(), signed)
    assert out[0].dtype == x.dtype and out[0].shape == x.shape
    assert torch.equal(out[0].cpu(), ref[0]), "forward must be bit-exact with the reference"
    # Reduction sizes: x_max and gates over all elements, g2 over one channel; terms ~ |g|·(x_max + 1).
    term_scale = (x_max.item() + 1.0) * grad.square().mean().sqrt().item()
    sizes = (1, x.numel(), x.numel(), x.numel() // (shape[0] if with_g2 else 1))
    for name, k, r, h, n in zip(("dx", "dx_max", "dgates", "dg2"), out[1:], ref[1:], hi[1:], sizes, strict=True):
        assert_a4(name, k, r, h, n, term_scale)
    first_zero = next((i for i, v in enumerate(gates) if v == 0), 4)
    assert torch.all(out[3][first_zero:] == 0), "gate gradients at/above the first zero gate must be exactly 0"


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("depth", sorted(DEPTH_GATES))
def test_kernel_matches_reference(device, backend, signed, depth):
    for shape in shapes_for(device, backend):
        for with_g2 in (True, False) if shape in SMALL_SHAPES else (len(shape) == 2,):
            check_against_reference(device, backend, shape, signed, DEPTH_GATES[depth], with_g2)


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("zero_at", range(4))
def test_exact_zero_gate_at_each_position(device, backend, zero_at):
    gates = [0.5 + 0.1 * i for i in range(4)]
    gates[zero_at] = 0.0
    check_against_reference(device, backend, (6, 4, 3, 3), True, tuple(gates), True)


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_half_precision_inputs(device, backend, dtype, signed):
    for shape in [(7, 3, 5, 5), (2, 3, 6, 5)]:
        check_against_reference(device, backend, shape, signed, DEPTH_GATES[32], shape[0] == 7, dtype)


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
def test_all_gates_one_and_random_gates(device, backend):
    check_against_reference(device, backend, (5, 9), True, (1.0, 1.0, 1.0, 1.0), True)
    gates = tuple((torch.rand(4) * 0.99 + 0.01).tolist())  # random gates in (0, 1]
    check_against_reference(device, backend, (5, 2, 3), False, gates, True)


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("bits", reference.BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_fixed_bit_matches_reference(device, backend, bits, signed):
    x, x_max, _, mask = make_inputs((8, 3, 3, 3), signed=signed, gates=DEPTH_GATES[32], with_g2=True, device=device)
    mask = (mask > 0).float()
    grad = torch.randn_like(x)
    out = run(lambda a, b, *_: bbkernels.fixed_quantize(a, b, bits, mask, signed=signed, backend=backend),
              x, x_max, None, None, grad)[:3]
    ref = run(lambda a, b, *_: reference.fixed_quantize(a, b, bits, mask.cpu(), signed=signed),
              x.cpu(), x_max.cpu(), None, None, grad.cpu())[:3]
    hi = run(
        lambda a, b, *_: reference.fixed_quantize(a, b, bits, mask.cpu(), signed=signed, compute_dtype=torch.float64),
        x.double().cpu(), x_max.double().cpu(), None, None, grad.double().cpu(),
    )[:3]
    assert torch.equal(out[0].cpu(), ref[0])
    assert_a4("dx", out[1], ref[1], hi[1])
    assert_a4("dx_max", out[2], ref[2], hi[2], x.numel(), x_max.item() + 1.0)


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
def test_non_contiguous_input(device, backend):
    base = torch.randn(24, 10, device=device)
    x = base.t()  # shape (10, 24), channel = dim 0, not contiguous
    assert not x.is_contiguous()
    x_max, gates, g2 = torch.tensor(2.0, device=device), torch.tensor([0.5, 0.6, 0.7, 0.8], device=device), None
    g2 = torch.rand(10, device=device)
    y = bbkernels.bb_quantize(x, x_max, gates, g2, signed=True, backend=backend)
    assert torch.equal(y.cpu(), reference.bb_quantize(x.cpu(), x_max.cpu(), gates.cpu(), g2.cpu(), signed=True))


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
def test_every_output_element_written(device, backend, monkeypatch):
    """Poison the allocator's memory first: stale values must not survive in y or dx."""
    shape = (9, 5, 7)
    for _ in range(3):
        torch.full(shape, float("nan"), device=device)
    check_against_reference(device, backend, shape, True, DEPTH_GATES[16], True)


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
def test_nan_input_stays_in_its_element(device, backend):
    x = torch.randn(6, 11, device=device)
    x[2, 3] = float("nan")
    y = bbkernels.bb_quantize(x, torch.tensor(2.0, device=device), torch.ones(4, device=device), signed=True,
                              backend=backend)
    nan = torch.isnan(y)
    assert nan[2, 3] and nan.sum() == 1


@pytest.mark.parametrize("device,backend", [k for k in KERNELS if k not in SLOW], ids=lambda v: str(v))
def test_reductions_are_deterministic(device, backend):
    x, x_max, g, g2 = make_inputs((300, 5000), signed=True, gates=DEPTH_GATES[32], with_g2=True, device=device)
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    first = run(lambda *a: bbkernels.bb_quantize(*a, signed=True, backend=backend), x, x_max, g, g2, grad)
    try:
        torch.set_num_threads(1)
        second = run(lambda *a: bbkernels.bb_quantize(*a, signed=True, backend=backend), x, x_max, g, g2, grad)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# --- gradients: closed form, finite differences ---------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("depth", sorted(DEPTH_GATES))
def test_closed_form_matches_autograd_of_reference(signed, depth):
    """SPEC B §10.3 against autograd through the straight-through reference, in float64."""
    x, x_max, gates, g2 = make_inputs((12, 3, 4, 4), signed=signed, gates=DEPTH_GATES[depth], with_g2=True)
    grad = torch.randn(x.shape, dtype=torch.float64)
    auto = run(
        lambda *a: reference.bb_quantize(*a, signed=signed, compute_dtype=torch.float64),
        x.double(), x_max.double(), gates.double(), g2.double(), grad,
    )
    closed = reference.closed_form_grads(grad, x.double(), x_max.double(), gates.double(), g2.double(), signed=signed)
    for name, a, c in zip(("dx", "dx_max", "dgates", "dg2"), auto[1:], closed, strict=True):
        torch.testing.assert_close(c.reshape(a.shape), a, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("bits", reference.BITS)
def test_closed_form_fixed_bit_matches_autograd(bits):
    x, x_max, _, mask = make_inputs((6, 20), signed=True, gates=DEPTH_GATES[32], with_g2=True)
    grad = torch.randn(x.shape, dtype=torch.float64)
    auto = run(
        lambda a, b, *_: reference.fixed_quantize(a, b, bits, mask.double(), signed=True, compute_dtype=torch.float64),
        x.double(), x_max.double(), None, None, grad,
    )
    closed = reference.closed_form_grads(grad, x.double(), x_max.double(), None, mask.double(), signed=True, bits=bits)
    torch.testing.assert_close(closed[0], auto[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(closed[1].reshape(()), auto[2].reshape(()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference"] + [b for d, b in KERNELS if d == "cpu"])
def test_gradcheck_gates(backend):
    """The output is multilinear in the gates, so central differences are exact up to fp32 rounding."""
    x = torch.randn(3, 4) * 2
    x_max = torch.tensor(2.5)
    gates = torch.tensor([0.6, 0.7, 0.4, 0.8], dtype=torch.float64, requires_grad=True)
    g2 = torch.tensor([0.5, 0.9, 0.3], dtype=torch.float64, requires_grad=True)
    if backend == "reference":
        fn = lambda g, c: reference.bb_quantize(x.double(), x_max.double(), g, c, signed=True,  # noqa: E731
                                                compute_dtype=torch.float64)
        assert torch.autograd.gradcheck(fn, (gates, g2))
    else:
        fn = lambda g, c: bbkernels.bb_quantize(x, x_max, g, c, signed=True, backend=backend).double()  # noqa: E731
        assert torch.autograd.gradcheck(fn, (gates, g2), eps=1e-2, atol=1e-4, rtol=1e-3)


# --- the op's contract ------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
def test_saves_only_x_and_small_tensors(device, backend):
    x = torch.randn(32, 64, 3, 3, device=device, requires_grad=True)
    x_max = torch.tensor(2.0, device=device, requires_grad=True)
    gates = torch.full((4,), 0.8, device=device, requires_grad=True)
    g2 = torch.rand(32, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bbkernels.bb_quantize(x, x_max, gates, g2, signed=True, backend=backend)
    large = [t for t in saved if t.numel() > x.shape[0] + 5]
    assert len(large) == 1 and large[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


@pytest.mark.parametrize("device,backend", KERNELS, ids=KERNEL_IDS)
def test_torch_compile_sees_one_op_without_graph_breaks(device, backend):
    x = torch.randn(8, 16, device=device, requires_grad=True)
    x_max = torch.tensor(2.0, device=device, requires_grad=True)
    gates = torch.tensor([0.9, 0.8, 0.0, 1.0], device=device, requires_grad=True)

    def f(x, x_max, gates):
        return bbkernels.bb_quantize(x, x_max, gates, signed=True, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, x_max, gates)
    out.backward()
    expected = f(x.detach(), x_max.detach(), gates.detach())
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None and x_max.grad is not None and gates.grad[2:].eq(0).all()


def test_bad_input_names_the_argument():
    x, x_max, gates = torch.randn(4, 5), torch.tensor(1.0), torch.ones(4)
    cases = [
        (TypeError, r"x must be a torch\.Tensor", dict(x=[[1.0] * 5] * 4)),
        (TypeError, r"x_max must be a torch\.Tensor", dict(x_max=1.0)),
        (TypeError, r"gates must be a torch\.Tensor", dict(gates=[1.0] * 4)),
        (TypeError, "x", dict(x=torch.ones(4, 5, dtype=torch.int32))),
        (TypeError, "x", dict(x=x.double())),
        (ValueError, "x is empty", dict(x=torch.randn(0, 5))),
        (ValueError, "x_max", dict(x_max=torch.tensor(0.0))),
        (ValueError, "x_max", dict(x_max=torch.tensor(-1.0))),
        (ValueError, "x_max", dict(x_max=torch.tensor(float("inf")))),
        (ValueError, "x_max", dict(x_max=torch.tensor(float("nan")))),
        (ValueError, "x_max", dict(x_max=torch.ones(2))),
        (ValueError, "gates", dict(gates=torch.ones(3))),
        (ValueError, "g2", dict(g2=torch.ones(5))),
        (ValueError, "x_max is on", dict(x_max=torch.tensor(1.0, device="meta"))),
        (TypeError, "signed", dict(signed=1)),
        (TypeError, "signed must be a bool, got NoneType", dict(signed=None)),
        (ValueError, "g2 must be finite", dict(g2=torch.tensor([1.0, float("nan"), 1.0, 1.0]))),
        (ValueError, "g2 must be finite", dict(g2=torch.tensor([1.0, 1.0, float("inf"), 1.0]))),
        (ValueError, "backend", dict(backend="fpga")),
    ]
    for backend in (None, "reference"):  # the op checks, or (reference) the public function alone
        for err, text, change in cases:
            args = dict(x=x, x_max=x_max, gates=gates, g2=None, signed=True, backend=backend) | change
            with pytest.raises(err, match=text):
                bbkernels.bb_quantize(args.pop("x"), args.pop("x_max"), args.pop("gates"), args.pop("g2"), **args)
        with pytest.raises(ValueError, match="bits"):
            bbkernels.fixed_quantize(x, x_max, 3, signed=True, backend=backend)
        with pytest.raises(ValueError, match="mask"):
            bbkernels.fixed_quantize(x, x_max, 8, torch.ones(3), signed=True, backend=backend)
        with pytest.raises(TypeError, match=r"mask must be a torch\.Tensor"):
            bbkernels.fixed_quantize(x, x_max, 8, [1.0] * 4, signed=True, backend=backend)
        with pytest.raises(ValueError, match="mask must be finite"):
            bbkernels.fixed_quantize(x, x_max, 8, torch.tensor([1.0, float("nan"), 0, 1]), signed=True, backend=backend)
    with pytest.raises(TypeError, match="signed must be a bool, got NoneType"):  # the raw op reads no None as False
        torch.ops.bbkernels.quantize(x, x_max.reshape(1), gates, None, None, 0)


def test_backend_selection(monkeypatch):
    assert bbkernels.resolve_backend("cpu") == ("cpu" if bbkernels.is_available("cpu") else "reference")
    monkeypatch.setenv(bbkernels.ENV_VAR, "reference")
    assert bbkernels.resolve_backend("cpu") == "reference"
    monkeypatch.setenv(bbkernels.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=bbkernels.ENV_VAR):
        bbkernels.resolve_backend("cpu")
    monkeypatch.delenv(bbkernels.ENV_VAR)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            bbkernels.resolve_backend("cpu", "cuda")


def test_reference_eval_grid_levels():
    """SPEC B §1.5: signed 2/4/8 bit give 3/15/255 levels, unsigned 4/16/256."""
    x = torch.linspace(-1.2, 1.2, 200001)
    x_max = torch.tensor(1.0)
    for bits, signed_levels in ((2, 3), (4, 15), (8, 255)):
        gates = torch.tensor([float(bits > 2), float(bits > 4), 0.0, 0.0])
        assert reference.bb_quantize(x, x_max, gates, signed=True).unique().numel() == signed_levels
        assert reference.bb_quantize(x, x_max, gates, signed=False).unique().numel() == 2**bits
    assert math.isclose(reference.bb_quantize(x, x_max, torch.zeros(4), signed=True).max().item(), 2 / 3, rel_tol=1e-6)
