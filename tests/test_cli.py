"""The CLI surface: version, help for every command, honest 'not available yet' errors, build."""

from __future__ import annotations

import json

import onnx
import pytest

from tcexport import __version__
from tcexport.core.artifacts import SIDECAR
from tests.conftest import assert_usage_error, run_cli

COMMANDS = ["export", "compress", "validate", "build", "bench", "inspect", "lint"]


def test_version_and_help():
    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_unknown_command_and_option_are_one_line():
    assert_usage_error(run_cli("frobnicate"))
    assert_usage_error(run_cli("bench", "--no-such-option", "x.onnx"))
    assert_usage_error(run_cli("export"))  # missing SPEC


def test_build_onnx_writes_model_and_sidecar(vit_onnx, tmp_path):
    out = tmp_path / "vit-ort"
    result = run_cli("build", vit_onnx, "-o", out)
    assert result.returncode == 0, result.stderr
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["backend"] == "ort" and sidecar["provider"] == "CPUExecutionProvider"
    assert sidecar["inputs"][0]["name"] == "pixel_values"
    assert sidecar["records"]["tcexport.source"]["spec"] == "timm:vit_tiny_patch16_224"
    import hashlib

    assert sidecar["source_sha256"] == hashlib.sha256(vit_onnx.read_bytes()).hexdigest()
    optimized = onnx.load(str(out / "model.onnx"))
    assert len(optimized.graph.node) == sidecar["nodes_after"] < sidecar["nodes_before"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", SIDECAR]


def test_build_from_model_spec(tmp_path):
    out = tmp_path / "conv-ort"
    result = run_cli("build", "py:tests.fixtures.factories:tiny_convnet", "--input-shape", "3x16x16", "-o", out)
    assert result.returncode == 0, result.stderr
    assert (out / "model.onnx").exists()


@pytest.mark.parametrize("make_input", ["missing", "garbage", "directory"])
def test_build_bad_input_leaves_nothing(tmp_path, make_input):
    target = tmp_path / "in.onnx"
    if make_input == "garbage":
        target.write_text("this is not onnx")
    elif make_input == "directory":
        target.mkdir()
    out = tmp_path / "out"
    assert_usage_error(run_cli("build", target, "-o", out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_build_unavailable_provider(vit_onnx, tmp_path):
    out = tmp_path / "out"
    result = run_cli("build", vit_onnx, "--provider", "cuda", "-o", out)
    assert_usage_error(result)
    assert not out.exists()
