"""The run plots read at a glance: legends above the data, integer epochs, accuracy within [0, 100], a fine-tuning
marker only with fine-tuning, a mark for layers without an activation quantizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bayesian_bits.pipeline import plots


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    return drawn


def _record(index: int, phase: str = "train") -> dict[str, Any]:
    return {"index": index, "phase": phase, "top1": 50.0 + index, "relative_bops": 10.0 / index}


def test_one_epoch_curves(figures: list[Any]) -> None:
    plots.plot_curves([_record(1)], Path("unused.png"), "t")
    ax = figures[0].axes[0]
    assert ax.get_ylim() == (0, 100)
    assert [t for t in ax.get_xticks() if 0.5 <= t <= 1.5] == [1.0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["top-1 % (left)", "relative BOPs % (right)"]


def test_finetune_marker_only_with_finetuning(figures: list[Any]) -> None:
    plots.plot_curves([_record(1), _record(2), _record(3, "finetune")], Path("unused.png"), "t")
    labels = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert labels[-1] == "fine-tuning starts"
    assert figures[0].axes[0].lines[-1].get_xdata()[0] == 2.5
    assert all(float(t).is_integer() for t in figures[0].axes[0].get_xticks())


def test_layers_legend_outside_and_bare_layers_marked(figures: list[Any]) -> None:
    rows = [{"name": "a", "weight_bits": 2, "act_bits": 2, "kept_out_pct": 100.0},
            {"name": "fc", "weight_bits": 8, "act_bits": None, "kept_out_pct": 100.0}]
    plots.plot_layers(rows, Path("unused.png"), "t")
    ax = figures[0].axes[0]
    legend = ax.get_legend()
    assert "no activation quantizer" in [t.get_text() for t in legend.get_texts()]
    figures[0].canvas.draw()  # the legend's box lies above the axes, not over the bars
    assert legend.get_window_extent().y0 >= ax.get_window_extent().y1 - 1
