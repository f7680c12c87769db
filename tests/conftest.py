"""Shared fixtures: tiny models exported once per test run, even when pytest-xdist runs several workers."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
# py: specs in tests import tests.fixtures.factories
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `tcexport ARGS` as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "tcexport.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_usage_error(result: subprocess.CompletedProcess) -> None:
    """tcexport's contract for bad input: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A directory holding what make(directory) writes, made once per test run.

    Under pytest-xdist every worker is its own session, so a session fixture would export the same model once
    per worker; instead the first worker makes it, under a file lock, in the run's shared temporary root
    (the workers' basetemps share a parent), and the others wait for it and reuse it.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        make(directory)
        return directory
    root = tmp_path_factory.getbasetemp().parent / "made_once"
    root.mkdir(exist_ok=True)
    directory, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a worker that failed half-way left this
            directory.mkdir()
            make(directory)
            done.touch()
    return directory


def exported(tmp_path_factory, name: str, spec: str, filename: str, **load_options) -> Path:
    """`spec` exported to ONNX once per test run (see made_once)."""

    def make(directory: Path) -> None:
        from tcexport import export, sources

        export.export_to_file(sources.load(spec, **load_options), directory / filename)

    return made_once(tmp_path_factory, name, make) / filename


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory) -> Path:
    """A vit_tiny state dict with seeded random weights, saved as a user's checkpoint file would be."""

    def make(directory: Path) -> None:
        import timm
        import torch

        torch.manual_seed(1234)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        torch.save(model.state_dict(), directory / "vit_tiny.pth")

    return made_once(tmp_path_factory, "ckpt", make) / "vit_tiny.pth"


@pytest.fixture(scope="session")
def vit_onnx(tmp_path_factory, vit_checkpoint) -> Path:
    return exported(tmp_path_factory, "vit", "timm:vit_tiny_patch16_224", "vit_tiny.onnx", checkpoint=vit_checkpoint)


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "minilm", "st:all-MiniLM-L6-v2", "minilm.onnx", seq_len=128)


@pytest.fixture(scope="session")
def deit_distilled_onnx(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "deit", "timm:deit_tiny_distilled_patch16_224", "deit_tiny_distilled.onnx", seed=3)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a transformers directory (what hf:DIR loads offline)."""

    def make(directory: Path) -> None:
        import torch
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
        torch.manual_seed(0)
        BertModel(config).save_pretrained(directory / "bert")

    return made_once(tmp_path_factory, "bert", make) / "bert"


@pytest.fixture(scope="session")
def bert_onnx(tmp_path_factory, bert_dir) -> Path:
    return exported(tmp_path_factory, "bert_onnx", f"hf:{bert_dir}", "bert.onnx", seq_len=24)
