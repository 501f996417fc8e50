"""Run output: the printed-and-logged text, ``metrics.jsonl`` (one line per epoch) and ``summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

LOG_FILE = "log"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunLog:
    """Prints on the main process and, with a logdir, appends to its ``log`` and ``metrics.jsonl`` files."""

    def __init__(self, logdir: Path | None, enabled: bool) -> None:
        self.logdir = logdir if enabled else None
        self.enabled = enabled

    def line(self, text: str) -> None:
        """Print ``text`` (without breaking progress bars) and append it to the log file."""
        if not self.enabled:
            return
        tqdm.write(text)
        if self.logdir is not None:
            with open(self.logdir / LOG_FILE, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")

    def metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to ``metrics.jsonl``."""
        if self.logdir is not None:
            with open(self.logdir / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(_clean(record), sort_keys=True) + "\n")

    def rewind(self, index: int) -> None:
        """Drop ``metrics.jsonl`` records after epoch ``index`` (a resumed run writes them again)."""
        if self.logdir is not None and (self.logdir / METRICS_FILE).exists():
            kept = [r for r in read_metrics(self.logdir) if r["index"] <= index]
            tmp = self.logdir / f".{METRICS_FILE}.tmp"
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
            tmp.replace(self.logdir / METRICS_FILE)

    def summary(self, record: dict[str, Any]) -> None:
        """Write ``summary.json`` (replacing any earlier one)."""
        if self.logdir is not None:
            tmp = self.logdir / f".{SUMMARY_FILE}.tmp"
            tmp.write_text(json.dumps(_clean(record), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            tmp.replace(self.logdir / SUMMARY_FILE)


def read_metrics(logdir: Path) -> list[dict[str, Any]]:
    """The records of ``logdir/metrics.jsonl`` (empty when absent)."""
    path = Path(logdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
