"""Shared fixtures: tiny models exported once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory) -> Path:
    """A vit_tiny state dict with seeded random weights, saved as a user's checkpoint file would be."""
    import timm
    import torch

    torch.manual_seed(1234)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def vit_onnx(tmp_path_factory, vit_checkpoint) -> Path:
    from tcexport import export, sources

    source = sources.load("timm:vit_tiny_patch16_224", checkpoint=vit_checkpoint)
    path = tmp_path_factory.mktemp("vit") / "vit_tiny.onnx"
    export.export_to_file(source, path)
    return path


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory) -> Path:
    from tcexport import export, sources

    source = sources.load("st:all-MiniLM-L6-v2", seq_len=128)
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    export.export_to_file(source, path)
    return path


@pytest.fixture(scope="session")
def deit_distilled_onnx(tmp_path_factory) -> Path:
    from tcexport import export, sources

    source = sources.load("timm:deit_tiny_distilled_patch16_224", seed=3)
    path = tmp_path_factory.mktemp("deit") / "deit_tiny_distilled.onnx"
    export.export_to_file(source, path)
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a transformers directory (what hf:DIR loads offline)."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert") / "bert"
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_onnx(tmp_path_factory, bert_dir) -> Path:
    from tcexport import export, sources

    source = sources.load(f"hf:{bert_dir}", seq_len=24)
    path = tmp_path_factory.mktemp("bert_onnx") / "bert.onnx"
    export.export_to_file(source, path)
    return path
