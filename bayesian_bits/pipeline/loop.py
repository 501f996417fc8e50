"""One training epoch and one evaluation pass (§6.6): loss = CE + λ·ΣR (+ weight decay), every optimizer stepped."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..budget import BopBudget
from ..errors import NonFiniteError
from .distributed import DistEnv, all_sum

POSTFIX_EVERY = 10  # iterations between progress-bar refreshes (each one reads the loss back to the host)


class TrainingModule(nn.Module):
    """The model plus its loss terms in one forward, so DDP sees every gate logit the regulariser touches.

    ``forward(x)`` returns (logits, regulariser, L2); the regulariser is zero when ``regularizer`` is None.
    """

    def __init__(
        self,
        model: nn.Module,
        regularizer: Callable[[nn.Module], Tensor] | None,
        decayed: Iterable[nn.Parameter] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.regularizer = regularizer
        self.decayed = list(decayed)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.model(x)
        zero = logits.new_zeros((), dtype=torch.float32)
        reg = self.regularizer(self.model) if self.regularizer is not None else zero
        l2 = 0.5 * sum((p.float().pow(2).sum() for p in self.decayed), zero) if self.decayed else zero
        return logits, reg, l2


@dataclass
class StepSettings:
    """How an iteration is run: λ (or a BOP budget's μ, updated after every step, and what its switching points
    do), the weight-decay factor, autocast dtype, optional fp16 grad scaler."""

    gating_lambda: float
    weight_decay: float
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    max_batches: int | None
    budget: BopBudget | None = None
    switch: Callable[[], None] | None = None  # called at the budget's switching points


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """CUDA autocast to ``dtype``, or nothing."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class EpochStats:
    """Averages over one training epoch."""

    loss: float
    ce: float
    reg: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_epoch(
    module: nn.Module,
    loader: DataLoader,
    optimizers: list[torch.optim.Optimizer],
    step_schedulers: list[torch.optim.lr_scheduler.LRScheduler],
    settings: StepSettings,
    env: DistEnv,
    desc: str,
    log_line: Callable[[str], None] | None = None,
    log_every: int | None = None,
) -> EpochStats:
    """Train ``module`` (a ``TrainingModule``, possibly DDP-wrapped) for one pass over ``loader``.

    ``step_schedulers`` are stepped after every iteration (fine-tuning); per-epoch ones are the caller's.
    """
    module.train()
    total = len(loader) if settings.max_batches is None else min(len(loader), settings.max_batches)
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, ce, reg (times batch size)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not env.is_main, dynamic_ncols=True, mininterval=0.5)
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    try:
        for i, (x, y) in enumerate(loader):
            if i >= total:
                break
            x = x.to(env.device, non_blocking=True)
            y = y.to(env.device, non_blocking=True)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            with autocast(env.device, settings.amp_dtype):
                logits, reg, l2 = module(x)
            ce = F.cross_entropy(logits.float(), y)
            lam = settings.gating_lambda if settings.budget is None else settings.budget.mu
            loss = ce + lam * reg + settings.weight_decay * l2
            if settings.scaler is not None:
                settings.scaler.scale(loss).backward()
                for opt in optimizers:
                    settings.scaler.step(opt)
                settings.scaler.update()
            else:
                loss.backward()
                for opt in optimizers:
                    opt.step()
            check_finite_step(module, params, (loss, ce, reg, l2), settings, f"{desc} iteration {i + 1}/{total}")
            if settings.budget is not None:
                settings.budget.step()
                if settings.budget.switch_due and settings.switch is not None:
                    settings.switch()
            for sched in step_schedulers:
                sched.step()
            n = y.shape[0]
            seen += n
            sums += torch.stack([loss.detach(), ce.detach(), reg.detach()]).double() * n
            bar.update(1)
            last = i + 1 == total
            if env.is_main and (i % POSTFIX_EVERY == 0 or last or (log_every and (i + 1) % log_every == 0)):
                avg = (sums / max(seen, 1)).tolist()
                rate = seen * env.world / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{avg[0]:.4f}", ce=f"{avg[1]:.4f}", reg=f"{avg[2]:.4g}", img_s=f"{rate:.0f}")
                if log_line is not None and log_every and (i + 1) % log_every == 0:
                    log_line(f"{desc}: {i + 1}/{total} loss {avg[0]:.4f} ce {avg[1]:.4f} reg {avg[2]:.4g} "
                             f"img/s {rate:.0f}")
    finally:
        bar.close()  # also when stopped: a message printed next starts on its own line
    seconds = time.perf_counter() - start
    totals = all_sum(env, [*sums.tolist(), float(seen)])
    images = int(totals[3])
    loss_avg, ce_avg, reg_avg = (t / max(images, 1) for t in totals[:3])
    return EpochStats(loss_avg, ce_avg, reg_avg, images, seconds)


def check_finite_step(module: nn.Module, params: list[Tensor], terms: tuple[Tensor, Tensor, Tensor, Tensor],
                      settings: StepSettings, where: str) -> None:
    """Raise ``NonFiniteError`` naming ``where`` and the loss terms if the loss or a stepped parameter is NaN or
    infinite (one host synchronisation per step; every process sees the same parameters under DDP)."""
    loss = terms[0].detach()
    finite = torch.isfinite(loss)
    if params:
        finite &= torch.isfinite(torch.nn.utils.get_total_norm(params, float("inf")))
    if bool(finite):
        return
    loss_v, ce, reg, l2 = (float(t.detach()) for t in terms)
    what = "loss"
    if math.isfinite(loss_v):
        names = {id(p): n.removeprefix("module.").removeprefix("model.") for n, p in module.named_parameters()}
        bad = [names.get(id(p), "?") for p in params if not bool(torch.isfinite(p).all())]
        what = f"parameters after the optimizer step ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})"
    raise NonFiniteError(f"non-finite {what} at {where}: loss {loss_v:.6g} = ce {ce:.6g} + gating-lambda "
                         f"{settings.gating_lambda:g} x reg {reg:.6g} + weight-decay {settings.weight_decay:g} x "
                         f"L2 {l2:.6g}")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, amp_dtype: torch.dtype | None) -> float:
    """Top-1 accuracy in % over the whole evaluation set (eval mode: deterministic gates, BN running stats);
    a ``NonFiniteError`` if any logit is NaN or infinite."""
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=env.device)
    broken = torch.zeros((), dtype=torch.float64, device=env.device)
    count = 0
    for x, y in tqdm(loader, desc="eval", disable=not env.is_main, leave=False, dynamic_ncols=True):
        x = x.to(env.device, non_blocking=True)
        y = y.to(env.device, non_blocking=True)
        with autocast(env.device, amp_dtype):
            logits = model(x)
        correct += (logits.argmax(dim=1) == y).sum()
        broken += (~torch.isfinite(logits)).any(dim=1).sum()
        count += y.shape[0]
    hits, bad, total = all_sum(env, [float(correct), float(broken), float(count)])
    if bad:
        raise NonFiniteError(f"evaluation: {int(bad)} of {int(total)} images gave NaN or infinite logits; no top-1 "
                             "is reported from them")
    return 100.0 * hits / max(total, 1.0)
