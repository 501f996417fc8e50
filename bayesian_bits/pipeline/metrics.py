"""Run output: the printed-and-logged text, ``metrics.jsonl`` (one line per epoch) and ``summary.json``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..checkpoint_io import write_atomic, write_error
from .errors import UsageError

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

    def line(self, text: str, echo: bool = True) -> None:
        """Print ``text`` (without breaking progress bars; unless ``echo`` is False) and append it to the log file."""
        if not self.enabled:
            return
        if echo:
            tqdm.write(text)
        if self.logdir is not None:
            self._append(LOG_FILE, text)

    def _append(self, name: str, text: str) -> None:
        path = self.logdir / name
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise write_error(path, exc) from None

    def metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to ``metrics.jsonl``."""
        if self.logdir is not None:
            self._append(METRICS_FILE, json.dumps(_clean(record), sort_keys=True))

    def rewind(self, index: int) -> None:
        """Drop ``metrics.jsonl`` records after epoch ``index`` (a resumed run writes them again)."""
        if self.logdir is not None and (self.logdir / METRICS_FILE).exists():
            kept = [r for r in read_metrics(self.logdir) if r["index"] <= index]
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode()
            write_atomic(self.logdir / METRICS_FILE, lambda fh: fh.write(text), size=len(text))

    def summary(self, record: dict[str, Any]) -> None:
        """Write ``summary.json`` (replacing any earlier one)."""
        if self.logdir is not None:
            text = (json.dumps(_clean(record), indent=2, sort_keys=True) + "\n").encode()
            write_atomic(self.logdir / SUMMARY_FILE, lambda fh: fh.write(text), size=len(text))


def read_metrics(logdir: Path) -> list[dict[str, Any]]:
    """The records of ``logdir/metrics.jsonl`` (empty when absent). A torn last line (the run was cut off while
    writing it) is dropped with a warning on stderr; a damaged line before it is a ``UsageError``."""
    path = Path(logdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "index" in record:
            records.append(record)
        elif number == len(lines):
            print(f"warning: {path}: dropped its torn last line ({len(line)} characters)", file=sys.stderr)
        else:
            raise UsageError(f"{path}: line {number} is not a metrics record; the file is damaged "
                             "(delete that line or start a new run)")
    return records
