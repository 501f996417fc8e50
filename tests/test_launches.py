"""Kernel launches per training step: a count (the same on every machine), so the goals of issue 21 hold as tests."""

from __future__ import annotations

from benchmarks.launches import measure


def test_resnet18_step_launches_few_kernels() -> None:
    rows = {row["variant"]: row for row in measure("resnet18", batch=2, size=32)}
    float_step, float_eval = rows["float"]["train_launches"], rows["float"]["eval_launches"]
    assert rows["bb exact"]["train_launches"] <= 3 * float_step  # 5,467 (33×) before the gate and fold banks
    assert rows["bb fast"]["train_launches"] <= 2 * float_step
    for fold in ("bb exact", "bb fast"):
        assert rows[fold]["eval_launches"] <= 2 * float_eval
        assert rows[fold]["train_syncs"] == rows[fold]["eval_syncs"] == 0  # no host reads of device values
    assert rows["bb fast"]["train_top"][0][1] < 100  # no op runs once per quantizer and per level any more
