"""What every benchmark of this folder shares: timing, peak memory, and rows stamped with where they were measured.

Timing: each call of a function is timed separately after warm-up calls; on the CPU with ``time.perf_counter``, on
CUDA with a pair of CUDA events around the call (the host waits for the end event before the next call). Results
are the median and the 20 % / 80 % quantiles of the per-call times, as ``triton.testing.do_bench`` reports them.

Peak memory: the most tensor bytes a call holds at once above those allocated when it started. On CUDA from
``torch.cuda.max_memory_allocated`` (the caching allocator's unused reserve excluded); on the CPU from the torch
profiler's allocation and free events (``profile_memory=True``), summed in time order. Both count tensors only;
the CPU figure comes from a separate, profiled call (resident set size is no measure: freed heap memory stays
resident and is reused).

Rows (CSV) and results (JSON) carry the device name, thread count, torch version and git commit.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (0.2, 0.8)  # reported beside the median
COMMIT_ENV = "BENCH_GIT_COMMIT"  # the commit, for copies of the tree without .git (a GPU machine's)


@dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds, in call order."""

    samples_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("Timing needs at least one sample; time the function with reps >= 1")

    def quantile(self, q: float) -> float:
        """The q-quantile of the samples, linearly interpolated between order statistics (numpy's default)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must lie in [0, 1], got {q}")
        ordered = sorted(self.samples_ms)
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    def summary(self, name: str = "ms", digits: int = 4) -> dict[str, float]:
        """``{name: median, name_q20: …, name_q80: …}``, rounded, for a row."""
        out = {name: round(self.median, digits)}
        out |= {f"{name}_q{round(100 * q)}": round(self.quantile(q), digits) for q in QUANTILES}
        return out


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """A function timing one call of its argument on `device`, in milliseconds."""
    if torch.device(device).type == "cuda":
        def cuda_ms(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return cuda_ms

    def cpu_ms(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return cpu_ms


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_alternating(fns: Mapping[str, Callable[[], object]], *, device: str = "cpu", warmup: int = 3,
                        reps: int = 15) -> dict[str, Timing]:
    """Time every function of `fns` `reps` times, taking turns call by call so that machine noise hits them alike,
    after `warmup` untimed rounds."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    time_call = _timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(time_call(fn))
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def measure(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 3, reps: int = 15) -> Timing:
    """Time `fn` `reps` times after `warmup` untimed calls."""
    return measure_alternating({"fn": fn}, device=device, warmup=warmup, reps=reps)["fn"]


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak live bytes of torch's CPU allocations during `fn`, from the profiler's allocation and free events."""
    with torch.autograd.profiler.profile(profile_memory=True) as prof:  # torch.profiler would import Inductor
        fn()
    events = [e for e in prof.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes of tensors allocated during one call of `fn` above those allocated before it."""
    if torch.device(device).type != "cuda":
        return _cpu_peak_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """``$BENCH_GIT_COMMIT``, else the checkout's HEAD (``+dirty`` with uncommitted changes to tracked files),
    else ``unknown``."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def metadata(device: str) -> dict[str, Any]:
    """Where a figure was measured: device name, CPU threads, torch version, git commit."""
    return {"device_name": device_name(device), "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "git_commit": git_commit()}


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], device: str) -> None:
    """Write `rows` (the union of their keys as columns, in first-seen order) with the metadata columns appended."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    meta = metadata(device)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    columns += [key for key in meta if key not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({**meta, **row} for row in rows)


def write_json(path: Path, result: Mapping[str, Any], device: str) -> dict[str, Any]:
    """Write `result` with the metadata keys added; returns what was written."""
    out = {**result, **metadata(device)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out
