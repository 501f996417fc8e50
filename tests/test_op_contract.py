"""The custom ops enforce their own contract: random invalid calls straight through torch.ops.bbkernels.*.

The calls run in a subprocess, so a crash or a hang fails the test instead of killing the test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bbkernels

CASES = 320

_FUZZ = textwrap.dedent(
    """
    import os, random, sys
    import torch
    import bbkernels
    from bbkernels import reference

    random.seed(int(sys.argv[1]))
    torch.manual_seed(int(sys.argv[1]))
    ops = torch.ops.bbkernels
    NAN, INF = float("nan"), float("inf")


    def valid():
        shape = random.choice([(6, 5), (6, 2, 3), (6,)])
        return dict(x=torch.randn(shape), x_max=torch.tensor(random.uniform(0.5, 3.0)),
                    gates=torch.rand(4), g2=random.choice([None, torch.rand(6)]), signed=random.random() < 0.5,
                    bits=0, grad=torch.randn(shape))


    def fixed(a, **change):
        a.update(bits=random.choice([2, 4, 8, 16, 32]), gates=None, **change)


    def set_gate(a, value):
        a["gates"][random.randrange(4)] = value


    def to_meta(a):
        name = random.choice([k for k in ("x_max", "gates", "g2") if a[k] is not None])
        a[name] = a[name].to("meta")


    MUTATIONS = {
        "bits": lambda a: a.update(bits=random.choice([1, 3, 5, 6, 7, 12, 33, 64, -2, 2**40])),
        "no gates": lambda a: a.update(gates=None),
        "gates with a bit width": lambda a: a.update(bits=random.choice([2, 4, 8, 16, 32])),
        "gates shape": lambda a: a.update(gates=torch.rand(random.choice([(3,), (5,), (4, 1), (2, 2), (), (0,)]))),
        "gates dtype": lambda a: a.update(gates=torch.ones(4, dtype=random.choice([torch.int32, torch.bool]))),
        "gates value": lambda a: set_gate(a, random.choice([NAN, INF, -INF])),
        "g2 shape": lambda a: a.update(g2=torch.rand(random.choice([(5,), (7,), (6, 1), (1,), (), (0,)]))),
        "mask shape": lambda a: fixed(a, g2=torch.rand(random.choice([(5,), (6, 6), ()]))),
        "g2 dtype": lambda a: a.update(g2=torch.ones(6, dtype=random.choice([torch.int64, torch.complex64]))),
        "g2 on 0-dim x": lambda a: a.update(x=torch.tensor(0.3), grad=torch.tensor(1.0), g2=torch.rand(1)),
        "empty x": lambda a: a.update(x=torch.randn(0, 5), grad=torch.randn(0, 5), g2=None),
        "x dtype": lambda a: a.update(x=a["x"].to(random.choice(
            [torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]))),
        "x_max dtype": lambda a: a.update(x_max=torch.tensor(2, dtype=random.choice([torch.int32, torch.int64]))),
        "x_max numel": lambda a: a.update(x_max=torch.full(random.choice([(2,), (0,), (1, 3)]), 2.0)),
        "x_max value": lambda a: a.update(x_max=torch.tensor(random.choice(
            [0.0, -0.0, -1.0, 1e-45, 1e-36, 1e-30, 1e-28, 2e37, 3e38, INF, -INF, NAN]))),
        "x_max value, fixed bits": lambda a: fixed(a, x_max=torch.tensor(random.choice([1e-36, 3e38, NAN, 0.0]))),
        "device": to_meta,
        "grad shape (backward)": lambda a: a.update(grad=torch.randn(6, 4)),
        "grad device (backward)": lambda a: a.update(grad=a["grad"].to("meta")),
        "grad dtype (backward)": lambda a: a.update(grad=torch.ones(a["x"].shape, dtype=torch.int32)),
    }
    BACKENDS = [b for b in ("reference", "cpu", "triton") if bbkernels.is_available(b, "cpu")]


    def call(a, backward, backend):
        # the op under the default policy, under the policy set by $BBKERNELS_BACKEND, or on a named backend
        args = ((a["grad"],) if backward else ()) + (a["x"], a["x_max"], a["gates"], a["g2"], a["signed"], a["bits"])
        if backend.startswith("env:"):
            os.environ[bbkernels.ENV_VAR] = backend[4:]
        try:
            if backend == "default" or backend.startswith("env:"):
                return (ops.quantize_backward if backward else ops.quantize)(*args)
            return (ops.quantize_backward_on if backward else ops.quantize_on)(*args, backend)
        finally:
            os.environ.pop(bbkernels.ENV_VAR, None)


    errors = {}
    for case in range(int(sys.argv[2])):
        name = random.choice(sorted(MUTATIONS))
        a = valid()
        MUTATIONS[name](a)
        backward = "backward" in name or random.random() < 0.5
        backend = random.choice(["default"] + [f"env:{b}" for b in BACKENDS] + BACKENDS)
        try:
            call(a, backward, backend)
        except (ValueError, TypeError) as err:
            errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
            continue
        print(f"case {case}: {name} on {backend} (backward={backward}) raised nothing", flush=True)
        sys.exit(1)

    # Still alive and correct: valid calls on every backend.
    a = valid()
    y_ref = reference.bb_quantize(a["x"], a["x_max"], a["gates"], a["g2"], signed=a["signed"])
    for backend in ["default", *BACKENDS]:
        assert torch.equal(call(a, False, backend), y_ref), backend
        assert call(a, True, backend)[0].shape == a["x"].shape, backend
    print("alive", errors)
    """
)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_invalid_calls_raise_and_the_process_survives(seed):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(bbkernels.ENV_VAR, None)
    run = subprocess.run([sys.executable, "-c", _FUZZ, str(seed), str(CASES // 2)], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert run.stdout.strip().startswith("alive"), run.stdout


def test_fake_implementations_check_the_contract():
    """Under fake tensors (torch.compile's tracing) the metadata checks run too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, x_max = torch.randn(6, 5), torch.tensor(2.0)
        assert torch.ops.bbkernels.quantize(x, x_max, torch.rand(4), None, True, 0).shape == x.shape
        with pytest.raises(ValueError, match="bits"):
            torch.ops.bbkernels.quantize(x, x_max, None, None, True, 3)
        with pytest.raises(ValueError, match="gates are required"):
            torch.ops.bbkernels.quantize(x, x_max, None, None, True, 0)
        with pytest.raises(ValueError, match="g2"):
            torch.ops.bbkernels.quantize_backward(x, x, x_max, torch.rand(4), torch.rand(5), True, 0)


@pytest.mark.parametrize("backend", [b for b in bbkernels.available_backends("cpu")])
def test_values_that_give_no_finite_grid_are_errors_on_every_backend(backend):
    x, gates = torch.randn(4, 5), torch.rand(4)
    for bad in (1e-36, 3e38, 0.0, float("nan")):
        with pytest.raises(ValueError, match="x_max must lie in"):
            bbkernels.bb_quantize(x, torch.tensor(bad), gates, signed=True, backend=backend)
    with pytest.raises(ValueError, match="gates must be finite"):
        bbkernels.bb_quantize(x, torch.tensor(2.0), torch.tensor([0.5, float("nan"), 1.0, 1.0]), signed=True,
                              backend=backend)  # fmt: skip
    lowest, highest = bbkernels.reference.X_MAX_RANGE
    for edge in (lowest, highest):
        for signed in (True, False):
            y = bbkernels.bb_quantize(x, torch.tensor(edge), torch.ones(4), signed=signed, backend=backend)
            assert torch.isfinite(y).all(), (edge, signed)
