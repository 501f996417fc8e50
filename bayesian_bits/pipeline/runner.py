"""``bayesian-bits train``: start-up (§6.2), the training epochs, fixed-gate fine-tuning (§6.9) and the outputs."""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint_io, data
from ..bops import assign_macs, bop_report, format_report
from ..budget import DEFAULT_MU, BopBudget
from ..calibration import calibrate, freeze_batch_norm
from ..errors import CheckpointError, ModelCodeError, NonFiniteError
from ..experiments import Experiment, check_stored_options, get_experiment, parse_model_args, quant_config
from ..finetune import convert_to_fixed
from ..models import resolve_float_model
from ..prepare import prepare
from ..quantizer import quantizers
from ..regularizer import regularizer
from . import checkpoint, plots
from .distributed import DistEnv, all_sum, broadcast_object, gather_objects, setup, teardown
from .errors import DataError, UsageError
from .loop import StepSettings, TrainingModule, evaluate, train_epoch
from .metrics import RunLog, read_metrics
from .optim import build_finetune_optimizers, build_optimizers, group_settings, select_kinds, split_parameters
from .options import DEBUG_BATCHES, check_numbers, eval_only_args, parse_overrides, train_defaults
from .rundir import RunDir, open_run_dir
from .schedules import ScheduleSpec, build_finetune_schedulers, build_schedulers, parse_lr_schedule

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CALIBRATION_IMAGES = 2  # §6.2 step 5
PROBE_BATCHES = 8  # training batches whose gate gradients rank the projection's switches
# Options that do not change what a run computes: a resumed run may pass other values; every other flag must match.
RUN_INDEPENDENT = ("resume", "checkpoint", "eval_only", "logdir", "make_subdir", "overwrite", "data_dir", "n_workers",
                   "device", "log_every", "save_checkpoints", "checkpointing", "compile", "trust_model_code")
# What a checkpoint needs beyond its model state to be resumed.
RESUME_KEYS = ("epoch", "index", "optimizers", "schedulers", "scaler", "rng", "options", "last_top1", "pre_ft_model")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global stream other code may draw from
    random.seed(seed)


def layer_summary(row: dict[str, Any]) -> dict[str, Any]:
    """The per-layer entry of summary.json: bit widths, kept channels and MACs."""
    keys = ("name", "weight_bits", "act_bits", "input_bits", "kept_out_pct", "kept_in_pct", "macs", "gbops")
    return {k: row[k] for k in keys}


@dataclass
class Phase:
    """The optimisation state of one phase: ``train`` (gated) or ``finetune`` (fixed gates)."""

    name: str
    epochs: int
    optimizers: dict[str, torch.optim.Optimizer]
    epoch_schedulers: dict[str, Any] = field(default_factory=dict)
    step_schedulers: dict[str, Any] = field(default_factory=dict)
    done: int = 0  # completed epochs of this phase

    def state(self) -> dict[str, Any]:
        return {
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in {**self.epoch_schedulers, **self.step_schedulers}.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in {**self.epoch_schedulers, **self.step_schedulers}.items():
            s.load_state_dict(state["schedulers"][k])


class Run:
    """One invocation of ``train``: holds the model, data, phases and outputs of this process."""

    def __init__(self, args: argparse.Namespace, exp: Experiment, schedule: ScheduleSpec, env: DistEnv,
                 ckpt: dict[str, Any] | None = None, trust_model_code: bool = True, fetch_data: bool = True) -> None:
        self.args, self.exp, self.schedule, self.env = args, exp, schedule, env
        self.ckpt = ckpt  # the checkpoint read (--eval-only: before its options were taken), or None
        self.trust_model_code = trust_model_code  # whether a package.module:callable --model may be imported
        self.fetch_data = fetch_data  # whether data may be downloaded or written into --data-dir (a folder named here)
        self.start = time.perf_counter()
        if args.amp and env.device.type != "cuda":
            raise UsageError(f"--amp {args.amp} needs a CUDA device (this run uses {env.device}); drop --amp")
        self.amp_dtype = AMP_DTYPES.get(args.amp) if args.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
        if args.batch_size % env.world:
            raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {env.world} processes; "
                             f"use a multiple of {env.world}")
        self.batch = args.batch_size // env.world
        self.max_batches = DEBUG_BATCHES if args.debug else args.max_batches
        self.run_dir: RunDir | None = None  # opened by ``open_logdir`` once the checkpoint to read is checked
        self.logdir: Path | None = None
        self.log = RunLog(None, env.is_main)
        self.index = 0  # completed epochs over both phases
        self.last_top1: float | None = None
        self.budget: BopBudget | None = None  # --target-rel-bops / --target-gbops, made with the model
        self.projection: dict[str, Any] | None = None  # what the projection onto the budget did
        self.last_saved: str | None = None  # the newest last.pth written by this run, and its epoch

    # ----- set-up -------------------------------------------------------------------------------------------
    def open_logdir(self) -> None:
        """Rank 0 opens (probes, locks, checks) the run folder; every rank stops with its error."""
        args, failure = self.args, None
        if args.logdir is not None and self.env.is_main:
            logdir = Path(args.logdir)
            if args.make_subdir:
                logdir = logdir / datetime.now().strftime("%Y%m%d-%H%M%S")
            try:
                if args.overwrite and args.checkpoint and Path(args.checkpoint).resolve().parent == logdir.resolve():
                    raise UsageError(f"--overwrite would delete --checkpoint {args.checkpoint}; pick another --logdir")
                self.run_dir = open_run_dir(logdir, resume=args.resume is not None, overwrite=args.overwrite)
            except UsageError as exc:
                failure = str(exc)
        failure = broadcast_object(self.env, failure)
        if failure is not None:
            raise UsageError(failure)
        if self.run_dir is not None:
            self.logdir = self.run_dir.path
            self.log = RunLog(self.logdir, self.env.is_main)

    def close(self) -> None:
        """Release the run folder's lock."""
        if self.run_dir is not None:
            self.run_dir.release()

    def build_data(self) -> None:
        args, env = self.args, self.env

        saved = (self.ckpt or {}).get("options", {}).get("dataset") or {}
        norm = (args.mean, args.std) if args.mean is not None else (
            (saved["mean"], saved["std"]) if saved.get("mean") is not None else None)

        def datasets() -> data.Data:
            return data.load_data(self.exp, args.data_dir, args.synthetic, args.synthetic_image_size,
                                  image_size=args.image_size, channels=args.channels, num_classes=args.num_classes,
                                  norm=norm, fetch=self.fetch_data)

        # Rank 0 downloads and verifies first; the others then read the files, or stop with rank 0's error.
        failure = None
        if env.is_main:
            try:
                self.train_set, self.val_set, info = datasets()
            except DataError as exc:
                failure = str(exc)
        failure = broadcast_object(env, failure)
        if failure is not None:
            raise DataError(failure)
        if not env.is_main:
            self.train_set, self.val_set, info = datasets()
        keys = ("channels", "image_size", "num_classes")
        if saved and any(saved.get(k) != info[k] for k in keys):
            raise DataError(f"--data-dir {args.data_dir}: its images ({', '.join(f'{k} {info[k]}' for k in keys)}) "
                            f"do not fit the checkpoint's model ({', '.join(f'{k} {saved.get(k)}' for k in keys)})")
        args.dataset = info  # stored with the options: what the model is rebuilt from
        workers = args.n_workers
        if workers is None:
            workers = max(1, min(self.exp.default_workers, (os.cpu_count() or 1) // env.world))
        pin = env.device.type == "cuda"
        self.train_loader = data.train_loader(self.train_set, self.batch, workers, env.rank, env.world,
                                              args.seed, pin)
        self.val_loader = data.eval_loader(self.val_set, self.batch, workers, env.rank, env.world, pin)

    def build_model(self) -> None:
        """Build, calibrate on 2 training images (same on every rank), optionally freeze BN, assign MACs."""
        args = self.args
        seed_everything(args.seed)
        self.mac_shape = tuple(args.dataset["mac_shape"])
        self.model = self.prepared_model(starting_weights=self.ckpt is None)
        self.model.to(self.env.device)
        # Compiled once; convert_to_fixed changes the model in place, and the compiled module recompiles for it.
        self.eval_model = torch.compile(self.model) if args.compile else self.model
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(args.seed))
        images = torch.stack([self.train_set[int(i)][0] for i in order[:CALIBRATION_IMAGES]])
        if quantizers(self.model):  # none with --no-weight-quant --no-act-quant: the float model
            calibrate(self.model, images.to(self.env.device))
        if args.static_fold_bn:
            freeze_batch_norm(self.model)
        if args.reg_type == "bop":
            assign_macs(self.model)
        self.budget = self.build_budget()

    def prepared_model(self, starting_weights: bool) -> nn.Module:
        """The quantized model of ``--model`` for this run's images; ``--pretrained``/``--weights`` only when
        ``starting_weights`` (a checkpoint's state replaces them otherwise). Bad specs and models are a
        ``UsageError`` naming the flag."""
        args = self.args
        try:
            model = resolve_float_model(args.model, pretrained=args.pretrained and starting_weights,
                                        num_classes=args.dataset["num_classes"], in_channels=self.mac_shape[1],
                                        weights=args.weights if starting_weights else None,
                                        model_args=parse_model_args(args.model_args),
                                        trust_code=self.trust_model_code)
        except ModelCodeError as exc:  # only a spec from --eval-only's checkpoint is not trusted
            raise UsageError(f"--checkpoint {args.checkpoint}: its {exc}") from None
        except ValueError as exc:  # messages start with "model …" or "weights …", the flag's name
            raise UsageError(f"--{exc}") from None
        except RuntimeError as exc:  # pretrained weights that cannot be fetched
            if not args.pretrained:
                raise
            raise UsageError(f"--pretrained: {exc}") from None
        try:
            return prepare(model, torch.zeros(self.mac_shape), quant_config(args), skip=args.skip,
                           overrides=parse_overrides(args.override))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise UsageError(f"--model {args.model}: cannot be prepared for {tuple(self.mac_shape[1:])} inputs "
                             f"({' '.join(str(exc).split())[:400]}); see --skip/--override, or the README's "
                             "'Bring your own model'") from None

    @property
    def steps_per_epoch(self) -> int:
        """Training steps per epoch (--max-batches caps them)."""
        return len(self.train_loader) if self.max_batches is None else min(len(self.train_loader), self.max_batches)

    def build_budget(self) -> BopBudget | None:
        """The budget of --target-rel-bops / --target-gbops (μ starts at --gating-lambda, 0 meaning 0.1), or None."""
        args = self.args
        if args.target_rel_bops is None and args.target_gbops is None:
            return None
        steps = self.steps_per_epoch
        flag = "--target-rel-bops" if args.target_rel_bops is not None else "--target-gbops"
        try:
            return BopBudget.for_training(self.model, steps_per_epoch=steps, epochs=args.epochs,
                                          mu=args.gating_lambda or DEFAULT_MU, target_rel_bops=args.target_rel_bops,
                                          target_gbops=args.target_gbops)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None

    def probe_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches whose gate gradients rank a projection's switches (drawn only when consumed)."""
        yield from itertools.islice(self.train_loader, PROBE_BATCHES)

    def switch_onto_reference(self) -> None:
        """A switching point of the budget: the eval model cut to the reference trajectory; a metrics record (phase
        "switch", in the epoch in progress, at fractional `epoch`), and a log line when anything was switched off."""
        result = self.budget.switch(self.probe_batches(), reduce=lambda values: all_sum(self.env, values))
        base = self.budget.baseline / 100.0
        record = {"index": self.index + 1, "phase": "switch", "epoch": self.budget.steps / self.steps_per_epoch,
                  "reference_rel_bops": self.budget.reference() / base, "before_rel_bops": result.before / base,
                  "after_rel_bops": result.after / base, "switched_off": len(result.switched_off)}
        if result.changed:
            self.log.line(f"switching point at epoch {record['epoch']:.3g}: eval {record['before_rel_bops']:.4g} % -> "
                          f"{record['after_rel_bops']:.4g} % BOPs (reference {record['reference_rel_bops']:.4g} %, "
                          f"{record['switched_off']} gates switched off)", echo=False)
        self.log.metrics(record)

    def project_onto_budget(self) -> None:
        """End of gate training: switch gates until the eval model is in the budget's band (SPEC A9); without
        fine-tuning, evaluate the projected model (the final one)."""
        result = self.budget.project(self.probe_batches(), reduce=lambda values: all_sum(self.env, values))
        base = self.budget.baseline / 100.0
        self.projection = {"before_rel_bops": result.before / base, "after_rel_bops": result.after / base,
                           "switched_off": len(result.switched_off), "switched_on": len(result.switched_on)}
        self.log.line(f"Projection onto {self.budget.target_rel_bops:.4g} % BOPs: {result.before / base:.4g} % -> "
                      f"{result.after / base:.4g} % ({len(result.switched_off)} gates switched off, "
                      f"{len(result.switched_on)} back on)")
        if result.changed and self.args.fixed_gate_finetune_epochs == 0:
            self.evaluate("After projection onto the budget")

    def main_phase(self) -> Phase:
        args = self.args
        settings = group_settings(args.optimizer, args.learning_rate, args.optimizer_q, args.learning_rate_q,
                                  args.optimizer_s, args.learning_rate_s)
        learn = select_kinds(args.learn, args.weight_quant and args.act_quant)
        optimizers = build_optimizers(self.model, settings, learn)
        return Phase("train", args.epochs, optimizers, build_schedulers(self.schedule, optimizers, args.epochs))

    def finetune_phase(self, steps_per_epoch: int) -> Phase:
        epochs = self.args.fixed_gate_finetune_epochs
        optimizers = build_finetune_optimizers(self.model, self.args.finetune_optimizer,
                                               self.args.finetune_learning_rate)
        return Phase("finetune", epochs, optimizers,
                     step_schedulers=build_finetune_schedulers(optimizers, epochs * steps_per_epoch))

    def wrap(self, with_regularizer: bool) -> nn.Module:
        """The module the loop trains: model + loss terms, DDP-wrapped under torchrun."""
        decayed = [p for _, p in split_parameters(self.model)["weight"]] if self.args.weight_decay else []
        gated = with_regularizer and bool(quantizers(self.model))  # the float model has nothing to regularise
        module = TrainingModule(self.model, regularizer if gated else None, decayed if with_regularizer else [])
        if self.env.distributed:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
        return torch.compile(module) if self.args.compile else module

    # ----- checkpoints --------------------------------------------------------------------------------------
    def save(self, phase: Phase, names: list[str], pre_ft_model: dict[str, Any] | None) -> None:
        rng = gather_objects(self.env, checkpoint.rng_state())
        if self.logdir is None:
            return
        state = {
            "phase": phase.name,
            "epoch": phase.done,
            "index": self.index,
            "model": self.model.state_dict(),
            "pre_ft_model": pre_ft_model,
            **phase.state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "options": vars(self.args),
            "last_top1": self.last_top1,
            "budget": None if self.budget is None else self.budget.state_dict(),
        }
        for name in names:
            checkpoint_io.save(state, self.logdir / name)
            if name == "last.pth":
                self.last_saved = f"{self.logdir / name} (after {phase.name} epoch {phase.done})"

    def check_resumable(self, ckpt: dict[str, Any]) -> None:
        """A resumed run continues the same run: every flag that changes it must equal the checkpoint's."""
        flag = f"--resume {self.args.resume}"
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing or not isinstance(ckpt["options"], dict):
            raise CheckpointError(f"{flag}: cannot be resumed: no {', '.join(missing) or 'options'} entries")
        if any(k.endswith(".gamma_4") for k in ckpt.get("model", {})):
            raise CheckpointError(f"{flag}: written before the gate bank (gate logits per quantizer), so its optimizer "
                                  "state does not fit this version; --eval-only and export read it, training "
                                  "starts anew")
        old, new = ckpt["options"], vars(self.args)
        diffs = [f"--{k.replace('_', '-')} {new[k]!r} (checkpoint: {old[k]!r})" for k in sorted(new)
                 if k in old and k not in RUN_INDEPENDENT and old[k] != new[k]]
        if diffs:
            raise UsageError(f"{flag}: these flags differ from the run that wrote it: {'; '.join(diffs)}. A resumed "
                             "run continues that run: pass its flags, or start a new run in another --logdir")

    def load_phase(self, phase: Phase, ckpt: dict[str, Any]) -> None:
        """Restore a phase's optimizers, schedulers, counters and random streams from the resumed checkpoint."""
        try:
            phase.load(ckpt)
            if self.scaler is not None and ckpt["scaler"] is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            self.restore_rng(ckpt)
            if self.budget is not None and ckpt.get("budget") is not None:
                self.budget.load_state_dict(ckpt["budget"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"--resume {self.args.resume}: its optimizer, scheduler or random state does not "
                                  f"fit this run ({type(exc).__name__}: {str(exc).strip()[:200]})") from None
        phase.done = ckpt["epoch"]
        self.index, self.last_top1 = ckpt["index"], ckpt["last_top1"]

    def restore_rng(self, ckpt: dict[str, Any]) -> None:
        states = ckpt["rng"]
        if len(states) == self.env.world:
            checkpoint.set_rng_state(states[self.env.rank])
        else:
            self.log.line(f"note: checkpoint has RNG states of {len(states)} processes, this run has "
                          f"{self.env.world}; random streams are reseeded")
            seed_everything(self.args.seed + 1 + self.env.rank + 1000 * ckpt["index"])

    # ----- reporting ----------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return bop_report(self.model)

    def evaluate(self, tag: str) -> tuple[float, dict[str, Any]]:
        report = self.report()
        self.log.line(format_report(report))
        top1 = evaluate(self.eval_model, self.val_loader, self.env, self.amp_dtype)
        self.log.line(f"{tag} Top-1-accuracy: {top1:.2f} %")
        self.last_top1 = top1
        return top1, report

    def record(self, phase: Phase, stats: Any, top1: float | None, report: dict[str, Any] | None) -> None:
        lrs = {k: o.param_groups[0]["lr"] for k, o in phase.optimizers.items()}
        record = {"index": self.index, "phase": phase.name, "epoch": phase.done, "lr": lrs}
        if stats is not None:
            record.update(loss=stats.loss, ce=stats.ce, reg=stats.reg, images_per_s=stats.images_per_s,
                          seconds=stats.seconds)
        if top1 is not None and report is not None:
            record.update(top1=top1, relative_bops=report["relative_bops"], gbops=report["gbops"])
        if self.budget is not None and phase.name == "train":
            status = self.budget.status()
            record.update(status)
            self.log.line(f"budget: target {status['target_rel_bops']:.4g} %, expected "
                          f"{status['expected_rel_bops']:.4g} %, eval {status['eval_rel_bops']:.4g} % BOPs, "
                          f"mu {status['mu']:.4g}")
        self.log.metrics(record)

    # ----- phases -------------------------------------------------------------------------------------------
    def run_phase(self, phase: Phase, module: nn.Module, pre_ft_model: dict[str, Any] | None) -> None:
        args = self.args
        budget = self.budget if phase.name == "train" else None
        settings = StepSettings(args.gating_lambda if phase.name == "train" else 0.0,
                                args.weight_decay if phase.name == "train" else 0.0,
                                self.amp_dtype, self.scaler, self.max_batches, budget,
                                None if budget is None else self.switch_onto_reference)
        while phase.done < phase.epochs:
            epoch = phase.done
            self.train_loader.sampler.set_epoch(self.index)
            label = "Epoch" if phase.name == "train" else "Fine-tune epoch"
            try:
                stats = train_epoch(module, self.train_loader, list(phase.optimizers.values()),
                                    list(phase.step_schedulers.values()), settings, self.env,
                                    desc=f"[{label} {epoch + 1}/{phase.epochs}]", log_line=self.log.line,
                                    log_every=args.log_every)
            except NonFiniteError as exc:
                self.diverged(exc)
            self.log.line(f"[{label} {epoch + 1}/{phase.epochs}] avg_loss {stats.loss:.4f} avg_ce {stats.ce:.4f} "
                          f"avg_reg {stats.reg:.4f} ({stats.seconds:.1f} s, {stats.images_per_s:.0f} img/s)")
            top1 = report = None
            last = epoch + 1 == phase.epochs
            if phase.name == "finetune" or last or (epoch + 1) % args.eval_every == 0:
                try:
                    top1, report = self.evaluate(f"{label} {epoch + 1}")
                except NonFiniteError as exc:
                    self.diverged(exc)
            for sched in phase.epoch_schedulers.values():
                sched.step()
            phase.done += 1
            self.index += 1
            self.record(phase, stats, top1, report)
            tag = str(phase.done) if phase.name == "train" else f"FT-{phase.done}"
            names = ["last.pth"] + ([f"epoch_{tag}.pth"] if args.save_checkpoints else [])
            self.save(phase, names, pre_ft_model)

    def diverged(self, exc: NonFiniteError) -> None:
        """Stop the run: log and raise the error with where the last good state lies."""
        if self.logdir is None:
            where = "nothing was written (no --logdir)"
        elif self.last_saved is None:
            where = "no checkpoint of this run was written before it"
        else:
            where = f"last good checkpoint: {self.last_saved}"
        message = f"training stopped: {exc}; {where}"
        self.log.line(message, echo=False)  # the command line prints it
        raise NonFiniteError(message) from None

    def finish(self, phase: Phase, pre_ft_model: dict[str, Any] | None) -> dict[str, Any]:
        top1 = self.last_top1
        if top1 is None:  # --epochs 0: evaluate the calibrated (or loaded) model once
            top1, _ = self.evaluate("Initial")
        report = self.report()  # the model's state at the end (equal to the last evaluation's)
        if not self.args.eval_only:
            self.save(phase, ["epoch_FINAL.pth"], pre_ft_model)
        summary = {
            "top1": top1,
            "relative_bops": report["relative_bops"],
            "gbops": report["gbops"],
            "layers": [layer_summary(row) for row in report["layers"]],
            "experiment": self.args.experiment,
            "model": self.args.model,
            "synthetic": self.args.synthetic is not None,
            "epochs": self.args.epochs,
            "finetune_epochs": self.args.fixed_gate_finetune_epochs,
            "world_size": self.env.world,
            "device": str(self.env.device),
            "wall_time_s": time.perf_counter() - self.start,
            "command": shlex.join(sys.argv),
            "target_rel_bops": None if self.budget is None else self.budget.target_rel_bops,
            "projection": self.projection,
        }
        self.log.summary(summary)
        if self.logdir is not None:
            title = f"{self.args.model} on {self.args.experiment}" + (" (synthetic data)" if self.args.synthetic
                                                                         else "")
            plots.plot_layers(summary["layers"], self.logdir / plots.BITS_PNG,
                              f"{title}: {top1:.2f}% top-1, {report['relative_bops']:.2f}% BOPs")
            plots.plot_curves(read_metrics(self.logdir), self.logdir / plots.CURVES_PNG, title)
            if self.budget is not None:
                plots.plot_budget(read_metrics(self.logdir), self.logdir / plots.BUDGET_PNG, title,
                                  report["relative_bops"])
        self.log.line(f"Done in {summary['wall_time_s']:.0f} s: top-1 {top1:.2f} %, relative BOPs "
                      f"{report['relative_bops']:.2f} %, {report['gbops']:.3g} GBOPs")
        return summary

    def execute(self) -> dict[str, Any]:
        args = self.args
        ckpt = self.ckpt  # read first: a bad path fails before any data or model work
        if args.resume is not None:
            ckpt = checkpoint_io.load_checkpoint(args.resume, "--resume")
            self.check_resumable(ckpt)
            self.ckpt = ckpt
        self.open_logdir()  # before any data or model work: an unusable folder fails at once
        self.build_data()
        self.build_model()
        self.log.line(f"Command: {shlex.join(sys.argv)}")
        self.log.line(repr(self.model))
        if ckpt is not None:
            source = f"--checkpoint {args.checkpoint}" if args.eval_only else f"--resume {args.resume}"
            checkpoint_io.load_model_state(self.model, ckpt, source, self.env.device)
        if args.eval_only:
            self.evaluate("Eval-only")
            return self.finish(Phase("eval", 0, {}), None)
        if ckpt is None:
            self.log.line(format_report(self.report()))
        else:
            self.log.rewind(ckpt["index"])
        seed_everything(args.seed + 1 + self.env.rank)  # per-process streams: gate samples, augmentation

        pre_ft_model = None
        phase = self.main_phase()
        if ckpt is None or ckpt["phase"] == "train":
            if ckpt is not None:
                self.load_phase(phase, ckpt)
            self.run_phase(phase, self.wrap(with_regularizer=True), None)
            if self.budget is not None:
                self.project_onto_budget()

        if args.fixed_gate_finetune_epochs > 0:
            steps = self.steps_per_epoch
            if ckpt is not None and ckpt["phase"] == "finetune":
                pre_ft_model = ckpt["pre_ft_model"]
                phase = self.finetune_phase(steps)
                self.load_phase(phase, ckpt)
            else:
                self.save(phase, ["epoch_FINAL_PRE_FT.pth"], None)
                pre_ft_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                convert_to_fixed(self.model)
                self.model.to(self.env.device)
                self.evaluate("After fixing the gates")
                phase = self.finetune_phase(steps)
            self.run_phase(phase, self.wrap(with_regularizer=False), pre_ft_model)
        return self.finish(phase, pre_ft_model)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``train`` with parsed and checked ``args``; returns the summary (also written to summary.json).
    ``--eval-only`` takes its options from the checkpoint (``eval_only_args``)."""
    ckpt = None
    # The model spec is the user's word when typed on this command line (train, --resume, --eval-only --model),
    # else the checkpoint's: then code it names runs only with --trust-model-code.
    trust_model_code = not args.eval_only or args.model is not None or args.trust_model_code
    fetch_data = args.data_dir is not None  # never a folder only the checkpoint names
    if args.eval_only:
        ckpt = checkpoint_io.load_checkpoint(args.checkpoint, "--checkpoint")
        saved = ckpt.get("options")
        if not isinstance(saved, dict) or "model" not in saved:
            raise CheckpointError(f"--checkpoint {args.checkpoint}: has no training options; pass a checkpoint "
                                  "written by bayesian-bits train")
        check_stored_options(saved, f"--checkpoint {args.checkpoint}")
        args = eval_only_args(args, saved, train_defaults())
        if not isinstance(args.data_dir, str):
            raise CheckpointError(f"--checkpoint {args.checkpoint}: stores no data folder; pass --data-dir")
        check_numbers(args)
    exp = get_experiment(args.experiment, args.model)
    schedule = parse_lr_schedule(args.lr_schedule or exp.default_lr_schedule)
    env = setup(args.device)
    try:
        run_ = Run(args, exp, schedule, env, ckpt, trust_model_code, fetch_data)
        try:
            return run_.execute()
        finally:
            run_.close()
    finally:
        teardown(env)
