"""An output path that cannot be created (a parent is an existing file, say `-o a.onnx/o18`) is bad input: one line
`error: cannot write ...`, exit 2, nothing written, and said before any expensive work starts.

The check is tcexport.core.atomic.check_writable; the stage entry points call it first and the atomic writers
call it again, so no writer can slip past it. Commands run in-process (click's CliRunner) with the stages' heavy
steps replaced by tripwires; a few run in a fresh process where torch and onnxruntime cannot even be imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from tcexport.core import atomic, onnxfile
from tcexport.core.errors import UsageError
from tests.conftest import ROOT, assert_usage_error

CONVNET = ["py:tests.fixtures.factories:tiny_convnet", "--input-shape", "3x16x16"]


def _matmul_model(path: Path) -> Path:
    """x[batch, 8] @ w -> y[batch, 8]: the smallest model every command accepts."""
    weight = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def work(tmp_path) -> Path:
    """m.onnx (a model), notes.txt (a plain file to write under), a recipe and calibration data."""
    _matmul_model(tmp_path / "m.onnx")
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "r.yaml").write_text("model: {spec: 'timm:vit_tiny_patch16_224'}\ncompress: {r: 4}\n")
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 8), np.float32))
    (tmp_path / "dir").mkdir()
    return tmp_path


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root (hidden temporaries too) with its bytes (None for directories)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _boom(*_args, **_kwargs):
    raise AssertionError("expensive work started before the output path was checked")


@pytest.fixture()
def tripwires(monkeypatch):
    """The first expensive step of each stage fails the test if it ever runs."""
    import tcexport.backends.ort
    import tcexport.pipeline
    import tcexport.tune.calibration
    import tcexport.validate.equality
    import tcexport.validate.fidelity
    from tcexport.bench import session as bench_session
    from tcexport.recipes import runner as recipe_runner

    monkeypatch.setattr(tcexport.pipeline, "load_source", _boom)  # export, build SPEC: loading the model
    monkeypatch.setattr(onnxfile, "load", _boom)  # compress, validate, tune: reading the graph
    monkeypatch.setattr(tcexport.backends.ort, "build", _boom)
    monkeypatch.setattr(tcexport.validate.equality, "validate", _boom)
    monkeypatch.setattr(tcexport.validate.fidelity, "compare_with_reference", _boom)
    monkeypatch.setattr(tcexport.tune.calibration, "load", _boom)
    monkeypatch.setattr(recipe_runner, "load", _boom)
    monkeypatch.setattr(bench_session, "run", _boom)  # bench: the runs


# (arguments, the option the error asks to change); paths relative to `work`
UNDER_A_FILE = {
    "export": (["export", *CONVNET, "-o", "notes.txt/x.onnx"], "-o"),
    "export --force": (["export", *CONVNET, "--force", "-o", "notes.txt/x.onnx"], "-o"),
    "export, file two levels up": (["export", *CONVNET, "-o", "notes.txt/sub/x.onnx"], "-o"),
    "compress": (["compress", "m.onnx", "--r", "4", "-o", "notes.txt/c.onnx"], "-o"),
    "compress --impl function": (["compress", "m.onnx", "--r", "4", "--impl", "function", "-o", "m.onnx/c.onnx"],
                                 "-o"),
    "build onnx (the reported case)": (["build", "m.onnx", "-o", "m.onnx/o18"], "-o"),
    "build --force": (["build", "m.onnx", "--force", "-o", "m.onnx/o18"], "-o"),
    "build spec": (["build", *CONVNET, "-o", "notes.txt/out"], "-o"),
    "build recipe": (["build", "r.yaml", "-o", "notes.txt/out"], "-o"),
    "validate --json": (["validate", "m.onnx", "--json", "notes.txt/v.json"], "--json"),
    "validate --reference-onnx --json": (["validate", "m.onnx", "--reference-onnx", "m.onnx", "--json",
                                          "notes.txt/v.json"], "--json"),
    "bench --json": (["bench", "m.onnx", "--iters", "1", "--json", "notes.txt/b.json"], "--json"),
    "bench --plot": (["bench", "m.onnx", "--iters", "1", "--plot", "notes.txt/b.png"], "--plot"),
    "tune": (["tune", "m.onnx", "--budget", "flops=0.75", "--data", "calib.npz", "--trials", "1", "-o",
              "notes.txt/tune"], "-o"),
}


def _invoke(work: Path, args: list[str]):
    from tcexport.cli import cli

    cwd = os.getcwd()
    os.chdir(work)  # relative paths, as a user types them
    try:
        return CliRunner().invoke(cli, args)
    finally:
        os.chdir(cwd)


def _assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash caught by the runner
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", list(UNDER_A_FILE))
def test_output_under_a_file_is_one_line_before_any_work(work, tripwires, name):
    args, option = UNDER_A_FILE[name]
    target = next(a for a in args if "/" in a and not a.startswith("py:"))
    blocker = "m.onnx" if target.startswith("m.onnx/") else "notes.txt"
    before = _tree(work)
    line = _assert_one_line_error(_invoke(work, args))
    assert line == f"error: cannot write {target}: {blocker} is a file, not a directory; choose another {option}"
    assert _tree(work) == before  # nothing created, nothing replaced


@pytest.fixture(scope="module")
def no_heavy_imports(tmp_path_factory) -> dict:
    """An environment where importing torch, onnxruntime, timm or transformers fails loudly."""
    blocked = tmp_path_factory.mktemp("blocked")
    for name in ("torch", "onnxruntime", "timm", "transformers", "sentence_transformers"):
        (blocked / name).mkdir()
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} was imported before the output "
                                                    "path was checked')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)])}


@pytest.mark.parametrize("args", [
    ["export", *CONVNET, "-o", "notes.txt/x.onnx"],
    ["build", "m.onnx", "-o", "m.onnx/o18"],
    ["build", *CONVNET, "-o", "notes.txt/out"],
    ["build", "r.yaml", "-o", "notes.txt/out"],
], ids=["export", "build onnx", "build spec", "build recipe"])
def test_said_before_torch_or_onnxruntime_load(work, no_heavy_imports, args):
    before = _tree(work)
    result = subprocess.run([sys.executable, "-m", "tcexport.cli", *args], cwd=work, env=no_heavy_imports,
                            capture_output=True, text=True, timeout=120)
    assert_usage_error(result)
    assert "cannot write" in result.stderr and "was imported before" not in result.stderr, result.stderr
    assert _tree(work) == before


# ---------------------------------------------------------------------------------------------- the check itself


def test_check_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert atomic.check_writable(tmp_path / "new" / "deeper" / "x.onnx") == tmp_path / "new" / "deeper" / "x.onnx"
    assert atomic.check_writable(tmp_path / "d", directory=True) == tmp_path / "d"
    assert atomic.check_writable(tmp_path / "f") == tmp_path / "f"  # replacing a file is overwrite's question
    cases = {
        tmp_path / "f" / "x.onnx": f"{tmp_path / 'f'} is a file, not a directory; choose another -o",
        tmp_path / "f" / "a" / "b": f"{tmp_path / 'f'} is a file, not a directory; choose another -o",
        tmp_path / "gone" / "x": f"{tmp_path / 'gone'} is a broken link; choose another -o",
        tmp_path / "d": "it is a directory; give a file name, or choose another -o",
    }
    for path, message in cases.items():
        with pytest.raises(UsageError) as caught:
            atomic.check_writable(path, "-o")
        assert str(caught.value) == f"cannot write {path}: {message}"
    with pytest.raises(UsageError, match="choose another output path$"):
        atomic.check_writable(tmp_path / "f" / "x")  # no option named: a library caller


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_refuses_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UsageError, match=f"{locked} is not writable; choose another -o"):
            atomic.check_writable(locked / "sub" / "x.onnx", "-o")
    finally:
        locked.chmod(0o700)


def test_the_atomic_writers_refuse_too(tmp_path):
    """What a stage forgot to check still ends as a UsageError, with nothing written."""
    (tmp_path / "f").write_text("x")
    model = onnx.load(str(_matmul_model(tmp_path / "m.onnx")))
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match="f is a file, not a directory"):
        with atomic.atomic_file(tmp_path / "f" / "out.json"):
            raise AssertionError("must not be reached")
    with pytest.raises(UsageError, match="f is a file, not a directory"):
        with atomic.atomic_dir(tmp_path / "f" / "out"):
            raise AssertionError("must not be reached")
    with pytest.raises(UsageError, match="f is a file, not a directory"):
        onnxfile.write(model, tmp_path / "f" / "out.onnx")
    assert _tree(tmp_path) == before
