"""Hard-concrete (L0) gates: training samples, the eval threshold and the probability of being on (SPEC B §2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETA = 2.0 / 3.0  # hard-concrete temperature β_hc
ZETA = 1.1
GAMMA_HC = -0.1
THRESHOLD = 0.34  # eval: gate on iff P(z = 0) < 0.34 (§1.9)
OFFSET = BETA * math.log(-GAMMA_HC / ZETA)  # −1.5985968…, log-odds shift of P(z = 0)
SKIP_BELOW = -2.0  # gamma <= −2 ends the gate chain (§1.8)


def sample(gamma: Tensor) -> Tensor:
    """One stretched-and-clamped hard-concrete sample per entry of `gamma` (gating method 'l0')."""
    u = torch.rand_like(gamma)
    return _stretch(torch.sigmoid((torch.logit(u) + gamma) / BETA))  # logit(u) = log u − log(1 − u)


def hard_sigmoid(gamma: Tensor) -> Tensor:
    """The deterministic training gate of gating method 'fixed'."""
    return _stretch(torch.sigmoid(gamma / BETA))


def _stretch(s: Tensor) -> Tensor:
    """s·(ζ − γ_hc) + γ_hc clamped to [0, 1]: hardtanh, whose backward is one op (clamp's passes the gradient at the
    bounds too, a set of measure zero, §2)."""
    return torch.nn.functional.hardtanh(s * (ZETA - GAMMA_HC) + GAMMA_HC, 0.0, 1.0)


def eval_gate(gamma: Tensor) -> Tensor:
    """0/1 gates of eval mode: on iff P(z = 0) = σ(offset − gamma) < 0.34, i.e. gamma > −0.9353 (§1.9)."""
    return (torch.sigmoid(OFFSET - gamma) < THRESHOLD).to(gamma.dtype)


def prob_on(gamma: Tensor) -> Tensor:
    """q(gamma) = P(z ≠ 0) = σ(gamma − offset), the probability the regulariser uses (§2)."""
    return torch.sigmoid(gamma - OFFSET)


def log_prob_on(gamma: Tensor) -> Tensor:
    """log q(gamma) = log σ(gamma − offset), finite for every finite gamma."""
    return torch.nn.functional.logsigmoid(gamma - OFFSET)


def prob_one(gamma: Tensor, method: str = "l0") -> Tensor:
    """P(z = 1), the training gate clamped at 1, which passes no data gradient to gamma: σ(gamma + offset) for
    'l0' samples, 0 or 1 for the deterministic 'fixed' gate (1 iff gamma ≥ −offset = β·ln 11)."""
    if method == "l0":
        return torch.sigmoid(gamma + OFFSET)
    return (gamma >= -OFFSET).to(gamma.dtype)


def gate(gamma: Tensor, *, training: bool, method: str) -> Tensor:
    """Gate values for logits `gamma`: a sample ('l0') or hard sigmoid ('fixed') in training, 0/1 in eval."""
    if not training:
        return eval_gate(gamma)
    return sample(gamma) if method == "l0" else hard_sigmoid(gamma)
