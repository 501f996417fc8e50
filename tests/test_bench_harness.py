"""The benchmark harness: statistics of known fake timings, call order, peak memory, rows stamped with metadata."""

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

META = ["device_name", "threads", "torch_version", "git_commit"]


def test_median_and_quantiles_of_known_samples() -> None:
    timing = harness.Timing((5.0, 1.0, 4.0, 2.0, 3.0))
    assert timing.median == 3.0
    assert timing.quantile(0.2) == pytest.approx(1.8) and timing.quantile(0.8) == pytest.approx(4.2)
    assert (timing.quantile(0.0), timing.quantile(1.0)) == (1.0, 5.0)
    assert timing.summary("ms") == {"ms": 3.0, "ms_q20": 1.8, "ms_q80": 4.2}
    assert harness.Timing((4.0, 1.0, 3.0, 2.0)).median == 2.5  # even count: mean of the middle two
    assert harness.Timing((7.0,)).summary("t") == {"t": 7.0, "t_q20": 7.0, "t_q80": 7.0}


def test_bad_timing_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        harness.Timing(())
    with pytest.raises(ValueError, match=r"quantile q must lie in \[0, 1\], got 1.5"):
        harness.Timing((1.0,)).quantile(1.5)
    with pytest.raises(ValueError, match="reps >= 1"):
        harness.measure(lambda: None, reps=0)


def test_measure_alternates_and_skips_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock that each call advances by a known step: the samples are exactly those steps."""
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    calls: list[str] = []
    durations = {"a": iter([9.0, 9.0, 0.003, 0.001, 0.002]), "b": iter([9.0, 9.0, 0.010, 0.030, 0.020])}

    def fn(name: str):
        def call() -> None:
            calls.append(name)
            clock[0] += next(durations[name])
        return call

    timings = harness.measure_alternating({"a": fn("a"), "b": fn("b")}, device="cpu", warmup=2, reps=3)
    assert calls == ["a", "b"] * 5
    assert timings["a"].samples_ms == pytest.approx((3.0, 1.0, 2.0))
    assert timings["b"].samples_ms == pytest.approx((10.0, 30.0, 20.0))
    assert (timings["a"].median, timings["b"].median) == (pytest.approx(2.0), pytest.approx(20.0))


def test_cpu_peak_memory_of_a_known_allocation_sequence() -> None:
    def allocate() -> None:
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a
        c = b + 1  # 8 MiB live again: the peak
        del b, c

    assert 8 << 20 <= harness.peak_memory(allocate, "cpu") < (8 << 20) + 1024
    kept = torch.ones(1 << 20)
    assert harness.peak_memory(lambda: kept.mul_(2), "cpu") < 1024  # in place: nothing above what was there


def test_csv_rows_carry_the_metadata_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(harness.COMMIT_ENV, "abc123")
    path = tmp_path / "sub" / "rows.csv"
    harness.write_csv(path, [{"provider": "cpu", "ms": 1.5}, {"provider": "copy", "ms": 0.25, "gbps": 40}], "cpu")
    with path.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["provider", "ms", "gbps", *META]
    assert [(r["provider"], r["ms"], r["gbps"]) for r in rows] == [("cpu", "1.5", ""), ("copy", "0.25", "40")]
    for row in rows:
        assert row["torch_version"] == torch.__version__ and row["git_commit"] == "abc123"
        assert row["device_name"] == harness.device_name("cpu") != ""
        assert row["threads"] == str(torch.get_num_threads())
    with pytest.raises(ValueError, match="no rows"):
        harness.write_csv(path, [], "cpu")


def test_json_result_carries_the_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(harness.COMMIT_ENV, raising=False)
    path = tmp_path / "result.json"
    written = harness.write_json(path, {"seconds": {"float": 1.0}}, "cpu")
    assert json.loads(path.read_text()) == written
    assert written["seconds"] == {"float": 1.0} and list(written)[1:] == META
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?|unknown", written["git_commit"])
