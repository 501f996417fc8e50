"""The README's Python blocks run as written: each section's blocks in order, in one namespace that holds only what the
README leaves to the reader (`images`, `labels`, `loader` and the files it names), on tiny random data; the Export
section's `bayesian-bits export` commands run first, on a checkpoint of a one-epoch synthetic MNIST run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from bayesian_bits.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _sections() -> dict[str, list[tuple[str, int, str]]]:
    """Section title → its fenced blocks as (language, first line, code)."""
    text = README.read_text()
    sections: dict[str, list[tuple[str, int, str]]] = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.+)$", text, re.M)]
    for (start, title), (end, _) in zip(starts, [*starts[1:], (len(text), "")], strict=True):
        for block in FENCE.finditer(text, start, end):
            line = text.count("\n", 0, block.start(2)) + 1
            sections.setdefault(title, []).append((block.group(1), line, block.group(2)))
    return sections


SECTIONS = _sections()


def _batches(n: int, shape: tuple[int, ...], classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand((4, *shape), generator=gen), torch.randint(0, classes, (4,), generator=gen))
            for _ in range(n)]


def _run_python(title: str, names: dict[str, Any]) -> None:
    blocks = [(line, code) for lang, line, code in SECTIONS[title] if lang == "python"]
    assert blocks, f"README section {title!r} has no Python block"
    for line, code in blocks:
        exec(compile(code, f"README.md:{line}", "exec"), names)  # the README's own code, from this checkout


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_bring_your_own_model_recipe_runs(in_tmp: Path) -> None:
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), "float.pt")  # "optional float weights"
    loader = _batches(2, (3, 32, 32), 10)
    names: dict[str, Any] = {"images": loader[0][0], "loader": loader}
    _run_python("Bring your own model", names)
    assert (in_tmp / "model.onnx").stat().st_size > 0
    assert names["budget"].target_rel_bops == 0.5


def test_export_commands_and_blocks_run(in_tmp: Path) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["train", "--experiment", "mnist", "--model", "lenet5quantized", "--synthetic", "16",
                 "--data-dir", "data", "--epochs", "1", "--batch-size", "8", "--n-workers", "0",
                 "--learned-scale", "range", "--include-pruning", "--logdir", "runs/mnist"]) == 0
    commands = [line for lang, _, code in SECTIONS["Export"] if lang == "bash" for line in code.splitlines()
                if line.startswith("bayesian-bits export")]
    assert len(commands) == 4
    for command in commands:
        assert main(shlex.split(command.split("#")[0])[1:]) == 0, command
    names: dict[str, Any] = {"images": torch.rand(4, 1, 28, 28)}
    _run_python("Export", names)
    assert names["logits"].shape == (4, 10) and names["manifest"]["layers"]


def test_library_blocks_run(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "weights='DEFAULT'": a file in torch's hub cache stands for the download this machine cannot make
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch"))
    weights = torchvision.models.ResNet50_Weights.DEFAULT
    cache = in_tmp / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cache.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), cache)
    (images, labels), = _batches(1, (3, 32, 32), 1000)
    w = torch.randn(8, 3, 3, 3)
    names: dict[str, Any] = {"images": images, "labels": labels, "w": w, "x_max": w.abs().amax().reshape(1),
                             "gates": torch.tensor([1.0, 1.0, 0.0, 0.0]), "g2": torch.ones(8), "mask": torch.ones(8)}
    _run_python("The library", names)
    assert torch.isfinite(names["loss"]) and names["y"].shape == w.shape
