"""Weights in an external .data file through every command: compress -> build -> bench -> validate
--reference-onnx, a self-contained build directory, weights hashed in the sidecar, and the layout rule of
tcexport.core.onnxfile (external data in -> external data out; over 2 GB -> external data)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tcexport.core import onnxfile
from tcexport.core.errors import UsageError
from tests.conftest import assert_usage_error, run_cli
from tests.fixtures.plain_onnx import export_tiny_vit


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _locations(path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


@pytest.fixture(scope="module")
def external_vit(tmp_path_factory):
    path = export_tiny_vit(tmp_path_factory.mktemp("external") / "vit.onnx", external_data=True)
    assert _locations(path) == {"vit.onnx.data"} and (path.parent / "vit.onnx.data").is_file()
    return path


@pytest.mark.slow
def test_compress_build_bench_validate_with_external_weights(external_vit, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(external_vit.parent, work)
    source = work / "vit.onnx"
    compressed = work / "vit_tome.onnx"
    result = run_cli("compress", source, "--r", "4", "-o", compressed)
    assert result.returncode == 0, result.stderr
    # The layout rule: the weights stay in an external file, named after the output.
    assert _locations(compressed) == {"vit_tome.onnx.data"} and (work / "vit_tome.onnx.data").is_file()
    assert all((work / name).stat().st_mode & 0o044 for name in ("vit_tome.onnx", "vit_tome.onnx.data"))

    build = tmp_path / "build"
    result = run_cli("build", compressed, "-o", build)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in build.iterdir()) == ["model.onnx", "model.onnx.data", "tcexport-build.json"]
    assert _locations(build / "model.onnx") == {"model.onnx.data"}
    sidecar = json.loads((build / "tcexport-build.json").read_text())
    assert sidecar["source_model"] == str(compressed.resolve())  # the file the user named, not a temporary one
    assert sidecar["source_sha256"] == _sha256(compressed)
    assert sidecar["source_weights"] == [{"file": str((work / "vit_tome.onnx.data").resolve()),
                                          "sha256": _sha256(work / "vit_tome.onnx.data")}]
    assert sidecar["model_files"] == ["model.onnx", "model.onnx.data"]

    # Move the originals away: everything below works from what moved or what the build holds.
    moved = tmp_path / "moved"
    work.rename(moved)
    feeds = {"pixels": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    from_build = ort.InferenceSession(str(build / "model.onnx")).run(None, feeds)[0]
    from_file = ort.InferenceSession(str(moved / "vit_tome.onnx")).run(None, feeds)[0]
    np.testing.assert_allclose(from_build, from_file, rtol=1e-4, atol=1e-5)

    bench_json = tmp_path / "bench.json"
    result = run_cli("bench", moved / "vit.onnx", build, "--iters", "3", "--warmup", "1", "--json", bench_json)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(bench_json.read_text())["results"]) == 2

    result = run_cli("validate", build, "--reference-onnx", moved / "vit.onnx", "--samples", "2",
                     "--min-cosine", "0.9")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "FIDELITY" in result.stdout and "PASSED" in result.stdout


def test_missing_weights_file_is_one_line(external_vit, tmp_path):
    lonely = tmp_path / "vit.onnx"
    shutil.copy(external_vit, lonely)  # without its .data file
    for args in (["compress", lonely, "--r", "2", "-o", tmp_path / "out.onnx"], ["build", lonely, "-o", tmp_path / "b"]):
        result = run_cli(*args)
        assert_usage_error(result)
        assert "vit.onnx.data is missing" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx"]  # nothing written


def _tiny_model() -> onnx.ModelProto:
    weight = onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_layout_rule_single_file_unless_source_had_external_data_or_too_large(tmp_path, monkeypatch):
    model = _tiny_model()
    inline = tmp_path / "inline.onnx"
    assert onnxfile.write(model, inline) == [inline]
    assert not onnxfile.has_external_data(inline)
    external = tmp_path / "external.onnx"
    assert onnxfile.write(model, external, external_data=True) == [external, tmp_path / "external.onnx.data"]
    assert onnxfile.external_data_files(external) == [tmp_path / "external.onnx.data"]
    assert model.graph.initializer[0].raw_data  # the caller's model is not rewritten by the save
    monkeypatch.setattr(onnxfile, "PROTOBUF_LIMIT", 1000)  # stand-in for 2 GB
    large = tmp_path / "large.onnx"
    onnxfile.write(model, large)
    assert onnxfile.has_external_data(large)
    for path in (inline, external, large):
        loaded = onnxfile.load(path)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
                                      onnx.numpy_helper.to_array(model.graph.initializer[0]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError):
        onnxfile.write(_tiny_model(), tmp_path / "out.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_load_reports_missing_weights(tmp_path):
    path = tmp_path / "m.onnx"
    onnxfile.write(_tiny_model(), path, external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(UsageError, match="m.onnx.data is missing"):
        onnxfile.load(path)


def test_build_directory_missing_its_weights_file_is_one_line(external_vit, tmp_path):
    build = tmp_path / "build"
    assert run_cli("build", external_vit, "-o", build).returncode == 0
    (build / "model.onnx.data").unlink()
    result = run_cli("bench", build, "--iters", "2", "--warmup", "0")
    assert_usage_error(result)
    assert "model.onnx.data, which is missing" in result.stderr
