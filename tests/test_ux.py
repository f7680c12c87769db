"""A new user's first hour: progress on stderr, no silent overwrites, fast honest errors, py: from the cwd.

Every CLI run here is a fresh process, as a user's would be. Models are tiny (tests.fixtures.factories).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest

from tcexport.core import overwrite
from tcexport.core import progress
from tcexport.models import spec_check
from tcexport.core.errors import UsageError
from tests.conftest import ROOT, assert_usage_error, run_cli

CONVNET = ["py:tests.fixtures.factories:tiny_convnet", "--input-shape", "3x16x16"]
HEAVY = ("torch", "onnxruntime", "timm", "transformers", "sentence_transformers")


# ---------------------------------------------------------------------------------------------- progress


def test_progress_lines_mode_writes_one_line_per_finished_step(monkeypatch):
    monkeypatch.setenv(progress.ENV, "lines")
    log = io.StringIO()
    with redirect_stderr(log):
        with progress.step("outer") as outer:
            with progress.step("inner", total=4) as inner:
                for _ in range(4):
                    progress.advance(inner, 1)  # a bar in a log: no output per advance
            outer.note("found 3 blocks")
        with pytest.raises(RuntimeError):
            with progress.step("fails"):
                raise RuntimeError("boom")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines  # the failed step writes nothing: its error says what happened
    assert lines[0].startswith("  inner (") and lines[0].endswith(" s)")  # nested steps are indented
    assert lines[1].startswith("outer: found 3 blocks (") and lines[1].endswith(" s)")


def test_progress_is_off_for_library_calls_and_auto_follows_the_terminal(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    log = io.StringIO()
    with redirect_stderr(log):
        with progress.step("quiet"):
            pass
    assert log.getvalue() == ""
    progress.configure("auto")
    try:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
        assert progress.mode() == "lines"
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        assert progress.mode() == "live"
        monkeypatch.setenv(progress.ENV, "off")
        assert progress.mode() == "off"
    finally:
        progress.configure("off")
    assert progress.format_seconds(75.4) == "1 min 15 s" and progress.format_seconds(2.25) == "2.2 s"


def test_cli_build_from_a_spec_shows_each_stage_on_stderr(tmp_path):
    out = tmp_path / "conv-ort"
    result = run_cli("build", *CONVNET, "-o", out)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    starts = ["load py:tests.fixtures.factories:tiny_convnet", "export py:tests.fixtures.factories:tiny_convnet",
              "check ONNX Runtime vs PyTorch at batch 1, 3", "build ONNX Runtime cpu"]
    assert [line[:len(s)] for line, s in zip(lines, starts)] == starts, result.stderr
    assert len(lines) == len(starts) and all(line.endswith(" s)") for line in lines)
    assert result.stdout.startswith(f"wrote {out}")  # stdout keeps only the result
    # The sidecar names what the user gave, not the temporary file the spec was exported to.
    sidecar = json.loads((out / "tcexport-build.json").read_text())
    assert sidecar["source_model"] == CONVNET[0]


def test_export_prints_the_check_before_wrote(tmp_path):
    out = tmp_path / "conv.onnx"
    result = run_cli("export", *CONVNET, "-o", out)
    assert result.returncode == 0, result.stderr
    stdout = result.stdout.splitlines()
    assert stdout[0].startswith("ONNX Runtime vs PyTorch (ok)") and stdout[-1] == f"wrote {out}"


# ---------------------------------------------------------------------------------------------- overwrite


def test_export_refuses_a_file_it_did_not_write_unless_forced(tmp_path):
    out = tmp_path / "precious.onnx"
    out.write_text("the user's own work")
    result = run_cli("export", *CONVNET, "-o", out)
    assert_usage_error(result)
    assert "--force" in result.stderr and out.read_text() == "the user's own work"
    assert run_cli("export", *CONVNET, "-o", out, "--force").returncode == 0
    assert overwrite.produced_by_tcexport(out)
    again = run_cli("export", *CONVNET, "-o", out)  # its own earlier export is replaced without --force
    assert again.returncode == 0, again.stderr


def test_build_refuses_a_directory_that_is_not_a_build(tmp_path):
    from tests.test_bench import make_matmul_model

    model = make_matmul_model(tmp_path / "m.onnx", [8, 8])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_usage_error(run_cli("build", model, "-o", out))
    assert (out / "notes.txt").read_text() == "keep me"
    assert run_cli("build", model, "-o", out, "--force").returncode == 0
    assert not (out / "notes.txt").exists() and (out / "tcexport-build.json").is_file()
    assert run_cli("build", model, "-o", out).returncode == 0  # an earlier build is replaced


def test_overwrite_rules_for_files_and_recipe_outputs(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    overwrite.check_file(empty, force=False)  # nothing to lose
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"\x08\x08\x12\x07pytorch")  # ir_version 8, producer 'pytorch'
    with pytest.raises(UsageError, match="not written by tcexport"):
        overwrite.check_file(foreign, force=False)
    overwrite.check_file(foreign, force=True)

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"recipe_source": str(recipe.resolve())}))
    note = overwrite.check_recipe_dir(out, recipe, force=False)
    assert note == f"replacing the earlier output of this recipe in {out}"
    other = tmp_path / "other.yaml"
    with pytest.raises(UsageError, match="holds the output of another recipe"):
        overwrite.check_recipe_dir(out, other, force=False)
    assert "(--force)" in overwrite.check_recipe_dir(out, other, force=True)
    (out / "summary.json").unlink()
    (out / "data.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="not the output of a recipe"):
        overwrite.check_recipe_dir(out, recipe, force=False)


# ---------------------------------------------------------------------------------------------- options that do not apply


@pytest.mark.parametrize("args, words", [
    (["timm:vit_tiny_patch16_224", "--seq-len", "16"], "--seq-len does not apply"),
    (["st:all-MiniLM-L6-v2", "--input-shape", "3x32x32"], "--input-shape does not apply"),
    (["py:tests.fixtures.factories:tiny_convnet", "--input-shape", "3x8x8", "--pretrained"], "--pretrained does not"),
    (["st:all-MiniLM-L6-v2", "--checkpoint", "w.pth"], "--checkpoint does not apply"),
    (["py:tests.fixtures.factories:tiny_convnet", "--input-shape", "3x8x8", "--seq-len", "8"], "not both"),
])
def test_options_that_do_not_apply_are_errors(tmp_path, args, words):
    result = run_cli("export", *args, "-o", tmp_path / "out.onnx")
    assert_usage_error(result)
    assert words in result.stderr and not (tmp_path / "out.onnx").exists()


def test_recipe_refuses_options_its_model_cannot_take():
    from tcexport.recipes import loading

    with pytest.raises(UsageError, match=r"^r\.yaml: model\.seq_len: seq_len does not apply to timm"):
        loading.parse({"model": {"spec": "timm:vit_tiny_patch16_224", "seq_len": 16}}, "r.yaml")
    with pytest.raises(UsageError, match=r"model\.input_shape: input_shape does not apply to st:"):
        loading.parse({"model": {"spec": "st:all-MiniLM-L6-v2", "input_shape": "3x8x8"}}, "r.yaml")


def test_spec_prefixes_match_the_loaders():
    from tcexport.models import sources

    assert set(spec_check.PREFIXES) == set(sources.LOADERS)


# ---------------------------------------------------------------------------------------------- py: from the cwd


def test_py_spec_imports_from_the_current_directory(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    (work / "mymodels.py").write_text("import torch\n\ndef make():\n    return torch.nn.Sequential("
                                      "torch.nn.Flatten(), torch.nn.Linear(12, 4))\n")
    # A launcher outside the project, like the installed console script: its sys.path does not hold the cwd
    # (python -m and python -c would add it themselves).
    launcher = tmp_path / "bin" / "tcexport_launcher.py"
    launcher.parent.mkdir()
    launcher.write_text("from tcexport.cli import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(launcher), "export", "py:mymodels:make", "--input-shape", "3x2x2",
                             "-o", "m.onnx"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (work / "m.onnx").is_file()


# ---------------------------------------------------------------------------------------------- fast errors


@pytest.fixture(scope="module")
def no_heavy_imports(tmp_path_factory) -> dict:
    """An environment where importing torch, onnxruntime, timm or transformers fails loudly."""
    blocked = tmp_path_factory.mktemp("blocked")
    for name in HEAVY:
        (blocked / name).mkdir()
        (blocked / name / "__init__.py").write_text(
            f"raise ImportError('{name} was imported before the inputs were checked')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)])}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bad_inputs")
    (work / "mine.onnx").write_text("a file the user made")
    (work / "notes").mkdir()
    (work / "notes" / "todo.txt").write_text("keep")
    (work / "badspec.yaml").write_text("model: {spec: 'timm:x', seq_len: 8}\ncompress: {r: 4}\n")
    (work / "good.yaml").write_text("model: {spec: 'timm:vit_tiny_patch16_224'}\ncompress: {r: 4}\n")
    from tests.test_bench import make_matmul_model

    make_matmul_model(work / "m.onnx", [8, 8])
    return work


BAD_COMMANDS = {
    "unknown spec": ["export", "tim:vit", "-o", "a.onnx"],
    "missing checkpoint": ["export", "timm:vit_tiny_patch16_224", "--checkpoint", "nope.pth", "-o", "a.onnx"],
    "seq-len for an image model": ["export", "timm:vit_tiny_patch16_224", "--seq-len", "8", "-o", "a.onnx"],
    "input-shape for text": ["export", "st:all-MiniLM-L6-v2", "--input-shape", "3x8x8", "-o", "a.onnx"],
    "py module missing": ["export", "py:no_such_module:make", "--input-shape", "3x8x8", "-o", "a.onnx"],
    "py without input": ["export", "py:tests.fixtures.factories:tiny_convnet", "-o", "a.onnx"],
    "bad input shape": ["export", "timm:vit_tiny_patch16_224", "--input-shape", "3xAx8", "-o", "a.onnx"],
    "bad batch": ["export", "timm:vit_tiny_patch16_224", "--batch", "zero", "-o", "a.onnx"],
    "export over a user's file": ["export", "timm:vit_tiny_patch16_224", "-o", "mine.onnx"],
    "hf directory missing": ["export", "hf:./no_such_dir", "-o", "a.onnx"],
    "build missing onnx": ["build", "missing.onnx", "-o", "out"],
    "build missing recipe": ["build", "missing.yaml", "-o", "out"],
    "build recipe with a bad model": ["build", "badspec.yaml", "-o", "out"],
    "build into a user's directory": ["build", "m.onnx", "-o", "notes"],
    "recipe into a user's directory": ["build", "good.yaml", "-o", "notes"],
    "build spec option": ["build", "timm:vit_tiny_patch16_224", "--seq-len", "8", "-o", "out"],
    "compress missing": ["compress", "missing.onnx", "--r", "4", "-o", "c.onnx"],
    "validate missing": ["validate", "missing.onnx"],
    "validate inputs missing": ["validate", "m.onnx", "--inputs", "missing.npz"],
    "bench missing": ["bench", "missing.onnx"],
    "bench bad shapes": ["bench", "m.onnx", "--shapes", "x=1x8"],
    "bench missing inputs file": ["bench", "m.onnx", "--load-inputs", "missing.npz"],
}


@pytest.mark.parametrize("name", list(BAD_COMMANDS))
def test_bad_input_is_reported_before_any_heavy_import(no_heavy_imports, bad_inputs, name):
    result = subprocess.run([sys.executable, "-m", "tcexport.cli", *BAD_COMMANDS[name]], cwd=bad_inputs,
                            env=no_heavy_imports, capture_output=True, text=True, timeout=120)
    assert_usage_error(result)
    assert "imported before the inputs were checked" not in result.stderr, result.stderr
    assert (bad_inputs / "mine.onnx").read_text() == "a file the user made"
    assert (bad_inputs / "notes" / "todo.txt").read_text() == "keep"
    assert not (bad_inputs / "out").exists() and not (bad_inputs / "a.onnx").exists()


def test_the_blocked_environment_really_blocks(no_heavy_imports, bad_inputs):
    """The test above proves something only if a command that needs torch does fail here."""
    result = subprocess.run([sys.executable, "-m", "tcexport.cli", "export", "timm:vit_tiny_patch16_224", "-o",
                             "a.onnx"], cwd=bad_inputs, env=no_heavy_imports, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "imported before the inputs were checked" in result.stderr


# ---------------------------------------------------------------------------------------------- validate's wording


def test_validate_lines_say_which_criterion_decided():
    from tcexport.validate import equality as validate

    reference = np.array([[1e-6, 1.0, 2.0]], dtype=np.float32)
    actual = reference + np.array([[5e-5, 0.0, 1e-5]], dtype=np.float32)
    compared = validate.compare(reference, actual, atol=1e-4, rtol=1e-4)
    assert compared["within_tolerance"] and compared["max_rel"] > 1e-4  # max rel alone would read as a failure
    assert compared["worst_ratio"] == pytest.approx(5e-5 / (1e-4 + 1e-4 * 1e-6), rel=1e-2)
    sample = {"index": 0, "batch": 1, "seed": 0, "outputs": {"logits": compared}, "within_tolerance": True,
              "discrete_divergence": False,
              "fidelity": {"logits": {"cosine_vs_uncompressed": 0.5, "top1_agreement": 0.0}}}
    report = validate.ValidationReport("m.onnx", 1e-4, 1e-4, samples=[sample])
    text = validate.format_report(report)
    assert "|err| <= atol + rtol*|ref|" in text.splitlines()[1]
    line = text.splitlines()[2]
    assert line.startswith("  sample 0 (batch 1) [ok]: logits: ") and "worst ratio 0.50" in line
    assert "fidelity vs uncompressed (information, not checked): cosine_vs_uncompressed 0.5000, top1_agreement " \
           "0.0000" in line
    failing = validate.compare(reference, reference + 1e-3, atol=1e-4, rtol=1e-4)
    assert not failing["within_tolerance"] and failing["worst_ratio"] > 1
    exact = validate.compare(reference, reference, atol=0.0, rtol=0.0)
    assert exact["within_tolerance"] and exact["worst_ratio"] == 0.0
