"""Runs and files that cannot be hijacked or silently ruined: no unpickled code, digests, NaN stops, locked run
folders, SIGTERM, torn metrics, full disks, one-line errors, resumes that would change the run; model code named by a
file, stored options, hostile numbers and images."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bayesian_bits import checkpoint_io, data
from bayesian_bits.cli import main
from bayesian_bits.errors import CheckpointError, DataError, NonFiniteError, WriteError
from bayesian_bits.experiments import EXPERIMENTS
from bayesian_bits.export import load_eval_model, load_packed, load_pruned
from bayesian_bits.pipeline import loop, runner
from bayesian_bits.pipeline.distributed import DistEnv
from bayesian_bits.pipeline.metrics import read_metrics
from bayesian_bits.pipeline.rundir import open_run_dir
from tests.interrupt import interrupted_in_epoch
from tests.test_data import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("manifest", "pruned", "packed", "onnx")
SMOKE = ["--experiment", "mnist", "--model", "lenet5quantized", "--synthetic", "16", "--batch-size", "8",
         "--optimizer", "Adam", "--learning-rate", "1e-3", "--learning-rate-q", "1e-3", "--learning-rate-s", "1e-3",
         "--gating-lambda", "0.1", "--reg-type", "bop", "--include-pruning", "--learned-scale", "range",
         "--n-workers", "0", "--eval-every", "1", "--seed", "5"]


def error_lines(stderr: str) -> int:
    """How many error lines the command printed (progress bars share stderr)."""
    return sum("error:" in line for line in stderr.splitlines())


def train(tmp_path: Path, *flags: str) -> int:
    return main(["train", "--data-dir", str(tmp_path / "data"), *SMOKE, *flags])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log folder of a finished 1-epoch run."""
    tmp = tmp_path_factory.mktemp("run")
    assert train(tmp, "--epochs", "1", "--logdir", str(tmp / "run")) == 0
    return tmp / "run"


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def malicious(run: Path, folder: Path, full: bool) -> tuple[Path, Path]:
    """A planted checkpoint whose pickle writes a marker file: a real checkpoint plus the payload, or the payload."""
    marker, path = folder / "marker", folder / ("planted.pth" if full else "payload.pth")
    content = checkpoint_io.load(run / "last.pth", "x") if full else {}
    torch.save({**content, "phase": "train", "model": content.get("model", {}), "extra": Payload(marker)}, path)
    return path, marker


@pytest.mark.parametrize("full", [True, False], ids=["planted-in-checkpoint", "payload-only"])
def test_malicious_pickle_runs_no_code_anywhere(run: Path, tmp_path: Path, full: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad, marker = malicious(run, tmp_path, full)
    calls = [["train", "--data-dir", str(tmp_path), *SMOKE, "--epochs", "1", "--resume", str(bad),
              "--logdir", str(tmp_path / "r")],
             ["train", "--data-dir", str(tmp_path), *SMOKE, "--eval-only", "--checkpoint", str(bad)],
             *(["export", str(bad), "--format", fmt, "-o", str(tmp_path / f"out.{fmt}")] for fmt in FORMATS)]
    for argv in calls:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{bad}: refused" in err and error_lines(err) == 1, err
    for load in (load_eval_model, load_pruned, load_packed):
        with pytest.raises(CheckpointError, match="refused"):
            load(bad)
    proc = subprocess.run([sys.executable, "-m", "evaluations.export_parity", str(bad), "--data-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{bad}: refused" in proc.stderr, proc.stderr
    assert not marker.exists()


def flip_bytes(src: Path, dst: Path, count: int = 64) -> None:
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xA5 for b in data[middle:middle + count])
    dst.write_bytes(bytes(data))


def test_flipped_bytes_are_refused_everywhere(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "flipped.pth"
    flip_bytes(run / "last.pth", bad)
    assert train(tmp_path, "--epochs", "1", "--resume", str(bad)) == 2
    assert train(tmp_path, "--eval-only", "--checkpoint", str(bad)) == 2
    assert main(["export", str(bad), "--format", "manifest", "-o", str(tmp_path / "m.json")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 3 and all(f"{bad}: damaged" in e for e in errors), errors
    assert not (tmp_path / "m.json").exists()
    for fmt, load in (("pruned", load_pruned), ("packed", load_packed)):
        out, broken = tmp_path / fmt, tmp_path / f"{fmt}.flipped"
        assert main(["export", str(run / "last.pth"), "--format", fmt, "-o", str(out)]) == 0
        flip_bytes(out, broken)
        with pytest.raises(CheckpointError, match="damaged"):
            load(broken)


def test_digest_covers_every_value(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    checkpoint_io.save({"model": {"w": torch.ones(3)}, "lr": 0.5, "names": ["a", "b"]}, path)
    assert checkpoint_io.load(path, "--x")["lr"] == 0.5
    for change in ({"lr": 0.25}, {"names": ["a", "c"]}, {"model": {"w": torch.tensor([1.0, 1.0, 1.5])}}):
        data = torch.load(path, weights_only=True)
        torch.save({**data, **change}, path.with_suffix(".bad"))
        with pytest.raises(CheckpointError, match="damaged"):
            checkpoint_io.load(path.with_suffix(".bad"), "--x")
    torch.save({"model": {}, "phase": "train"}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="no content digest"):
        checkpoint_io.load(tmp_path / "plain.pth", "--x")


def test_nan_loss_stops_the_run_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logdir = tmp_path / "nan"
    assert train(tmp_path, "--epochs", "2", "--gating-lambda", "1e39", "--logdir", str(logdir)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at [Epoch 1/2] iteration 1/2" in err and "gating-lambda 1e+39" in err
    assert "no checkpoint" in err and error_lines(err) == 1
    assert not list(logdir.glob("*.pth")) and not (logdir / "summary.json").exists()
    assert "training stopped" in (logdir / "log").read_text()


def test_divergence_leaves_the_last_good_checkpoint_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    real, calls = runner.train_epoch, []

    def poisoned(module, *args, **kwargs):  # the second epoch starts from NaN weights
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(module.parameters()).fill_(float("nan"))
        return real(module, *args, **kwargs)

    monkeypatch.setattr(runner, "train_epoch", poisoned)
    logdir = tmp_path / "div"
    assert train(tmp_path, "--epochs", "3", "--logdir", str(logdir)) == 1
    err = capsys.readouterr().err
    assert "[Epoch 2/3] iteration 1/2" in err and f"last good checkpoint: {logdir / 'last.pth'}" in err
    assert sorted(p.name for p in logdir.glob("*.pth")) == ["last.pth"]
    assert checkpoint_io.load_checkpoint(logdir / "last.pth", "x")["epoch"] == 1
    assert not (logdir / "summary.json").exists()


def test_non_finite_values_are_never_saved_or_evaluated(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match=r"model\.w"):
        checkpoint_io.save({"model": {"w": torch.tensor([1.0, float("inf")])}}, tmp_path / "x.pth")
    assert not list(tmp_path.iterdir())
    env = DistEnv(0, 1, torch.device("cpu"))
    data = [(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))]
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="2 of 2 images"):
        loop.evaluate(model, data, env, None)


def test_second_run_on_a_locked_logdir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logdir = tmp_path / "busy"
    holder = open_run_dir(logdir, resume=False, overwrite=False)  # another run holds the folder
    try:
        assert train(tmp_path, "--epochs", "1", "--logdir", str(logdir)) == 2
        err = capsys.readouterr().err
        assert "is in use by another run" in err and f"pid {os.getpid()}" in err
    finally:
        holder.release()
    assert train(tmp_path, "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir)) == 0


def test_concurrent_process_is_refused(tmp_path: Path) -> None:
    logdir = tmp_path / "busy"
    hold = ("import sys, time; from pathlib import Path; from bayesian_bits.pipeline.rundir import open_run_dir; "
            f"open_run_dir(Path({str(logdir)!r}), False, False); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "bayesian_bits.train", "--data-dir", str(tmp_path), *SMOKE,
                               "--logdir", str(logdir)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and f"pid {holder.pid}" in proc.stderr, proc.stderr


def test_run_folders_never_mix(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logdir = tmp_path / "r"
    assert train(tmp_path, "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir)) == 0
    assert train(tmp_path, "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train(tmp_path, "--epochs", "2", "--max-batches", "1", "--logdir", str(logdir), "--overwrite",
                 "--target-rel-bops", "3") == 0
    assert [r["index"] for r in read_metrics(logdir) if r["phase"] == "train"] == [1, 2]
    assert (logdir / "log").read_text().count("Done in") == 1
    assert json.loads((logdir / "summary.json").read_text())["epochs"] == 2
    assert (logdir / "budget.png").is_file()  # a budget run's plot, replaced by the next --overwrite like the rest
    (logdir / "notes.txt").write_text("mine")
    assert train(tmp_path, "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir), "--overwrite") == 2
    assert "not run outputs (notes.txt)" in capsys.readouterr().err and (logdir / "notes.txt").exists()


def test_files_are_0644_and_stale_temporaries_go(run: Path, tmp_path: Path) -> None:
    for name in ("last.pth", "epoch_FINAL.pth", "summary.json", "metrics.jsonl", "training_curves.png"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    out = tmp_path / "m.packed"
    assert main(["export", str(run / "last.pth"), "--format", "packed", "-o", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o644
    logdir = tmp_path / "stale"
    assert train(tmp_path, "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir)) == 0
    stale = logdir / ".last.pth.k2j4h.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train(tmp_path, "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir), "--resume",
                 str(logdir / "last.pth")) == 0
    assert not stale.exists() and not checkpoint_io.temp_files(logdir)


class SigtermAfter:
    """A loader that sends this process SIGTERM after ``batches`` batches, as a batch scheduler would."""

    def __init__(self, loader, batches: int) -> None:
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.batches:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--epochs", "2", "--max-batches", "3"]
    assert train(tmp_path, *flags, "--logdir", str(tmp_path / "straight")) == 0
    real, calls = runner.train_epoch, []

    def terminated(module, loader, *args, **kwargs):
        calls.append(1)
        return real(module, SigtermAfter(loader, 1) if len(calls) == 2 else loader, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "train_epoch", terminated)
        assert train(tmp_path, *flags, "--logdir", str(tmp_path / "cut")) == 143
    err = capsys.readouterr().err
    assert f"terminated (SIGTERM); continue with --resume {tmp_path / 'cut'}/last.pth" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    cut = tmp_path / "cut"
    assert train(tmp_path, *flags, "--logdir", str(cut), "--resume", str(cut / "last.pth")) == 0
    straight = checkpoint_io.load(tmp_path / "straight" / "epoch_FINAL.pth", "x")["model"]
    resumed = checkpoint_io.load(tmp_path / "cut" / "epoch_FINAL.pth", "x")["model"]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_torn_metrics_line_is_dropped_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    logdir = tmp_path / "torn"
    with interrupted_in_epoch(monkeypatch):
        assert train(tmp_path, "--epochs", "2", "--max-batches", "1", "--logdir", str(logdir)) == 130
    with open(logdir / "metrics.jsonl", "a") as fh:
        fh.write('{"index": 2, "phase": "tr')  # power lost mid-line
    assert train(tmp_path, "--epochs", "2", "--max-batches", "1", "--logdir", str(logdir), "--resume",
                 str(logdir / "last.pth")) == 0
    assert "dropped its torn last line" in capsys.readouterr().err
    assert [r["index"] for r in read_metrics(logdir)] == [1, 2]


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    real_epoch, real_usage, calls = runner.train_epoch, checkpoint_io.shutil.disk_usage, []
    usage = namedtuple("usage", "total used free")

    def full_after_first(*args, **kwargs):
        calls.append(1)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(runner, "train_epoch", full_after_first)
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage",
                        lambda p: usage(10**9, 10**9 - 1000, 1000) if len(calls) > 1 else real_usage(p))
    logdir = tmp_path / "full"
    assert train(tmp_path, "--epochs", "2", "--max-batches", "1", "--logdir", str(logdir)) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == 1 and "no space left on the disk mounted at" in err
    assert "0.0 MB free" in err and "MB needed" in err and str(logdir / "last.pth") in err
    assert checkpoint_io.load_checkpoint(logdir / "last.pth", "x")["epoch"] == 1
    assert not checkpoint_io.temp_files(logdir)


def test_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def no_space(fh) -> None:
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match="no space left"):
        checkpoint_io.write_atomic(path, no_space)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_unwritable_places_fail_early_in_one_line(run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # ImageNet is absent from tmp_path: the folder is checked before any data is looked for.
    argv = ["train", "--experiment", "imagenet", "--model", "resnet18", "--data-dir", str(tmp_path),
            "--logdir", str(blocker / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "ImageNet" not in err
    assert main(["export", str(run / "last.pth"), "--format", "manifest", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(run / "last.pth"), "--format", "manifest", "-o", str(blocker / "m.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_read_only_data_folder_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    from bayesian_bits import mnist_files
    from bayesian_bits.errors import DataError

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"any bytes"))
    monkeypatch.setattr(mnist_files, "MNIST_MD5", {"train-images-idx3-ubyte": mnist_files.md5(b"any bytes")})

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint_io.tempfile, "mkstemp", read_only)
    with pytest.raises(DataError, match=r"Permission denied.*make .* writable"):
        mnist_files.ensure_mnist(tmp_path)


def edited(run: Path, path: Path, **changes) -> Path:
    ckpt = checkpoint_io.load(run / "last.pth", "x")
    ckpt.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del ckpt[key]
    checkpoint_io.save(ckpt, path)
    return path


def test_resume_refuses_changes_and_foreign_state(run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    last = str(run / "last.pth")
    assert train(tmp_path, "--epochs", "1", "--resume", last, "--learning-rate", "0.5", "--epochs", "3") == 2
    err = capsys.readouterr().err
    assert "--epochs 3 (checkpoint: 1)" in err and "--learning-rate 0.5 (checkpoint: 0.001)" in err
    cases = {"unknown phase 'bogus'": {"phase": "bogus"}, "no rng entries": {"rng": None},
             "optimizer, scheduler or random state does not fit": {"optimizers": {}},
             "weights do not fit": {"model": {"conv.weight": torch.ones(1)}}}
    for i, (message, change) in enumerate(cases.items()):
        bad = edited(run, tmp_path / f"bad{i}.pth", **change)
        assert train(tmp_path, "--epochs", "1", "--resume", str(bad)) == 2
        err = capsys.readouterr().err
        assert message in err and str(bad) in err and error_lines(err) == 1, err


def test_library_does_not_import_the_pipeline_or_touch_matplotlib() -> None:
    code = ("import matplotlib; matplotlib.use('svg'); import sys; import bayesian_bits, bayesian_bits.export, "
            "bayesian_bits.data, bayesian_bits.checkpoint_io; "
            "print(matplotlib.get_backend(), any(m.startswith('bayesian_bits.pipeline') for m in sys.modules)); "
            "import bayesian_bits.pipeline.runner; print(matplotlib.get_backend())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "False", "svg"]
    package = ROOT / "bayesian_bits"
    cli = {package / "cli.py", package / "train.py"}  # the command line drives the pipeline
    for path in package.rglob("*.py"):
        if "pipeline" in path.relative_to(package).parts or path in cli:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            assert not any(n == "pipeline" or ".pipeline" in f".{n}" for n in names), (path, names)


# A file never chooses code to run (SPEC A10): crafted model specs in re-signed checkpoints and exports.
CRAFTED_SPECS = ["antigravity:geohash", "evilmod:build", "code:interact", "os:abort", "sys:exit", "this:s"]


def _resigned(source: Path, path: Path, spec: str) -> Path:
    """`source` with its stored model spec replaced and the digest recomputed, as anyone can."""
    data = checkpoint_io.load(source, "x")
    data.pop(checkpoint_io.DIGEST_KEY, None)
    checkpoint_io.save({**data, "options": {**data["options"], "model": spec}}, path)
    return path


@pytest.fixture
def traps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder to run from that springs a marker on any import or call the specs name: a `$BROWSER` script for
    antigravity, an evilmod.py beside the file, console input for code.interact."""
    marker = tmp_path / "marker"
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\ntouch {marker}\n")
    browser.chmod(0o755)
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\ndef build(**_): pass\n")
    monkeypatch.setenv("BROWSER", str(browser))
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(f"open({str(marker)!r}, 'w')\n"))
    monkeypatch.chdir(tmp_path)
    return marker


@pytest.mark.parametrize("spec", CRAFTED_SPECS)
def test_a_model_spec_in_a_file_runs_no_code(run: Path, tmp_path: Path, traps: Path, spec: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _resigned(run / "epoch_FINAL.pth", tmp_path / "ckpt.pth", spec)
    files_before = set(tmp_path.iterdir())
    calls = [["train", "--eval-only", "--checkpoint", str(ckpt), "--n-workers", "0"],
             *(["export", str(ckpt), "--format", fmt, "-o", str(tmp_path / f"out.{fmt}")] for fmt in FORMATS)]
    for argv in calls:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert error_lines(err) == 1 and "Traceback" not in err, err
        assert "names code to import" in err and "--trust-model-code" in err, err
    # --resume builds the model its command line names (--model is required) and refuses a run whose spec differs
    last = _resigned(run / "last.pth", tmp_path / "last.pth", spec)
    files_before.add(last)
    assert main(["train", "--data-dir", str(run.parent / "data"), *SMOKE, "--epochs", "1", "--resume", str(last),
                 "--logdir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == 1 and f"--model 'lenet5quantized' (checkpoint: '{spec}')" in err, err
    with pytest.raises(CheckpointError, match="trust_model_code=True"):
        load_eval_model(ckpt)
    assert not traps.exists()
    assert set(tmp_path.iterdir()) == files_before  # nothing written, nothing downloaded
    assert str(tmp_path) not in sys.path


def test_exports_naming_code_need_trust(run: Path, tmp_path: Path, traps: Path) -> None:
    for fmt, loader in (("pruned", load_pruned), ("packed", load_packed)):
        good = tmp_path / f"good.{fmt}"
        assert main(["export", str(run / "epoch_FINAL.pth"), "--format", fmt, "-o", str(good)]) == 0
        bad = _resigned(good, tmp_path / f"bad.{fmt}", "evilmod:build")
        with pytest.raises(CheckpointError, match="names code to import"):
            loader(bad)
    assert not traps.exists()


def test_confirmed_model_code_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own module: trained with --model, evaluated with the same --model or --trust-model-code."""
    monkeypatch.chdir(ROOT)
    flags = [f for f in SMOKE if f not in ("--model", "lenet5quantized")]
    flags[flags.index("mnist")] = "fashion-mnist"
    logdir = tmp_path / "own"
    assert main(["train", "--data-dir", str(tmp_path / "data"), *flags, "--model", "tests.zoo:small_cnn_for",
                 "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir)]) == 0
    ckpt = str(logdir / "epoch_FINAL.pth")
    assert main(["train", "--eval-only", "--checkpoint", ckpt, "--n-workers", "0"]) == 2
    assert main(["train", "--eval-only", "--checkpoint", ckpt, "--n-workers", "0", "--trust-model-code"]) == 0
    assert main(["train", "--eval-only", "--checkpoint", ckpt, "--n-workers", "0",
                 "--model", "tests.zoo:small_cnn_for"]) == 0
    assert main(["export", ckpt, "--format", "manifest", "-o", str(tmp_path / "m.json"), "--trust-model-code"]) == 0
    assert load_eval_model(ckpt, trust_model_code=True).name == "tests.zoo:small_cnn_for"


class BlockedPayload:
    """Unpickling this would call os.system: torch 2.14 refuses it as a GLOBAL of a blocked module."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("payload", [BlockedPayload(), Payload(Path("/nonexistent/marker"))], ids=["blocked", "global"])
def test_every_wording_of_a_refused_pickle_says_refused(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "payload.pth"
    torch.save({"x": payload}, path)
    with pytest.raises(CheckpointError, match=r"refused: it holds pickled objects.*(GLOBAL|global)"):
        checkpoint_io.load(path, "--checkpoint")


def test_export_never_destroys_a_checkpoint(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes((run / "epoch_FINAL.pth").read_bytes())
    other = tmp_path / "last.pth"  # another run's checkpoint
    other.write_bytes((run / "last.pth").read_bytes())
    before = {p: p.read_bytes() for p in (ckpt, other)}
    for out, extra in ((ckpt, []), (ckpt, ["--overwrite"]), (other, []), (other, ["--overwrite"])):
        capsys.readouterr()
        assert main(["export", str(ckpt), "--format", "manifest", "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert error_lines(err) == 1 and "Traceback" not in err, err
    assert all(p.read_bytes() == content for p, content in before.items())
    plain = tmp_path / "model.json"
    assert main(["export", str(ckpt), "--format", "manifest", "-o", str(plain)]) == 0
    assert main(["export", str(ckpt), "--format", "manifest", "-o", str(plain)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "manifest", "-o", str(plain), "--overwrite"]) == 0


@pytest.mark.parametrize(("entry", "value"), [
    ("synthetic_image_size", 10**9), ("num_classes", 10**12), ("override", "conv1:weight_bits=8"), ("skip", [3]),
    ("dataset", {"channels": 1, "num_classes": 10, "image_size": 28, "mac_shape": [1, 1, 10**6, 10**6]}),
    ("dataset", "not a dict"), ("gamma_4_init", float("nan")), ("include_pruning", "yes"), ("experiment", "evil"),
])
def test_stored_options_are_untrusted_input(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            entry: str, value: object) -> None:
    data = checkpoint_io.load(run / "epoch_FINAL.pth", "x")
    data = {**data, "options": {**data["options"], entry: value}}
    ckpt = tmp_path / "edited.pth"
    torch.save({**data, checkpoint_io.DIGEST_KEY: checkpoint_io.digest(data)}, ckpt)  # re-signed as anyone can
    for argv in (["train", "--eval-only", "--checkpoint", str(ckpt), "--n-workers", "0"],
                 ["export", str(ckpt), "--format", "manifest", "-o", str(tmp_path / "m.json")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert error_lines(err) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "m.json").exists()


def test_eval_only_creates_nothing_where_only_the_checkpoint_points(run: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = checkpoint_io.load(run / "epoch_FINAL.pth", "x")
    data.pop(checkpoint_io.DIGEST_KEY, None)
    elsewhere = tmp_path / "not" / "yours"
    options = {k: v for k, v in data["options"].items() if k not in ("synthetic", "synthetic_image_size")}
    ckpt = tmp_path / "real-data.pth"
    checkpoint_io.save({**data, "options": {**options, "synthetic": None, "data_dir": str(elsewhere)}}, ckpt)
    assert main(["train", "--eval-only", "--checkpoint", str(ckpt), "--n-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "pass --data-dir" in err and error_lines(err) == 1, err
    assert not (tmp_path / "not").exists()


@pytest.mark.parametrize("flags", [
    ["--gamma-4-init", "nan"], ["--override", "features.0:gamma_inits=nan/6/6/6"], ["--seed", str(10**20)],
    ["--synthetic", str(10**11)], ["--gating-lambda", "-1"], ["--weight-decay", "-1"], ["--lr-schedule", "cosine:nan"],
    ["--synthetic", "100000", "--synthetic-image-size", "4000"], ["--override", "featurse.0:weight_bits=8"],
    ["--skip", "clasifier.*"], ["--weights", "/etc/passwd"], ["--epochs", "-1"],
], ids=lambda f: " ".join(f)[:40])
def test_bad_numbers_are_one_line_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       flags: list[str]) -> None:
    argv = [*SMOKE, "--epochs", "1", "--logdir", str(tmp_path / "run"), *flags]  # a repeated flag: the last wins
    assert main(["train", "--data-dir", str(tmp_path / "data"), *argv]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run" / "last.pth").exists()


def test_an_override_that_matches_nothing_names_the_nearest_modules(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, "--epochs", "1", "--override", "featurse.0:weight_bits=8") == 2
    err = capsys.readouterr().err
    assert "'featurse.0' matches no module" in err and "features.0" in err, err


def test_weights_holding_nan_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bayesian_bits.models import build_float_model

    state = build_float_model("lenet5quantized").state_dict()
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "w.pt")
    assert train(tmp_path, "--epochs", "1", "--weights", str(tmp_path / "w.pt")) == 2
    err = capsys.readouterr().err
    assert "features.0.weight" in err and "NaN" in err and error_lines(err) == 1, err


def test_a_gzip_bomb_in_the_mnist_folder_is_not_decompressed_whole(tmp_path: Path) -> None:
    import gzip

    from bayesian_bits.errors import DataError
    from bayesian_bits.mnist_files import SIZES, ensure_idx

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as fh:  # 16 MB of zeros in a 16 KB file
        for _ in range(16):
            fh.write(bytes(2**20))
    with pytest.raises(DataError, match=f"more than the {SIZES['train-labels-idx1-ubyte']:,} bytes"):
        ensure_idx(tmp_path, "MNIST")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels, followed by a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def _noise_png(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


BAD_IMAGES = {
    "text": (lambda p: p.write_text("not an image"), "not a readable image"),
    "empty": (lambda p: p.write_bytes(b""), "an empty file"),
    "bomb": (lambda p: p.write_bytes(_png_header(40_000, 40_000)), "too large"),
    "self-symlink": (lambda p: p.symlink_to(p.name), "not a readable image"),
    "truncated": (lambda p: (_noise_png(p), p.write_bytes(p.read_bytes()[:3000])), "image"),
}


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_a_bad_image_stops_the_run_before_training_in_one_line_naming_it(tmp_path: Path, kind: str, split: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    write_image_folder(tmp_path / "images", {"a": 2, "b": 2}, "L")
    make, says = BAD_IMAGES[kind]
    bad = tmp_path / "images" / split / "b" / "bad.png"
    make(bad)
    argv = ["train", "--experiment", "imagefolder", "--data-dir", str(tmp_path / "images"), "--model",
            "lenet5quantized", "--image-size", "28", "--epochs", "1", "--n-workers", "0",
            "--logdir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == 1 and "Traceback" not in err
    assert re.search(f"error: --data-dir: image {re.escape(str(bad))} is .*{says}", err)
    assert not list((tmp_path / "run").glob("*.pth"))  # stopped before the first epoch, not after it


def test_folder_symlink_loops_are_listed_once(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"a": 3, "b": 2}, "RGB")
    (tmp_path / "train" / "a" / "again").symlink_to(tmp_path / "train" / "a", target_is_directory=True)
    (tmp_path / "train" / "b" / "elsewhere").symlink_to(tmp_path / "val" / "b", target_is_directory=True)
    loaded = data.load_data(EXPERIMENTS["imagefolder"], tmp_path, image_size=16)
    assert len(loaded.train) == 3 + 2 + 2  # the loop adds nothing; a link to another folder adds its images
    assert len(loaded.val) == 5


def test_a_truncated_training_image_read_by_a_worker_is_one_line_naming_it(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"a": 2, "b": 2}, "RGB")
    bad = tmp_path / "train" / "b" / "bad.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:2000])  # a JPEG header verifies; only decoding finds the missing data
    loaded = data.load_data(EXPERIMENTS["imagefolder"], tmp_path, image_size=16, norm=([0.5] * 3, [0.25] * 3))
    says = rf"^--data-dir: image {re.escape(str(bad))} cannot be decoded \(image file is truncated.*\); remove or"
    with pytest.raises(DataError, match=says) as caught:
        list(torch.utils.data.DataLoader(loaded.train, batch_size=8, num_workers=1))
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
