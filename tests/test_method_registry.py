"""A method is one file: a throwaway method registered here (and nowhere else) shows up in `compress --help`,
takes its options and `--stage` text, passes recipe checks, compresses a ViT and validates, with no other file
changed. Also: the generic parameter checks every declaration gets, and declarations that cannot work."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from click.testing import CliRunner

from tcexport.cli import cli
from tcexport.compress import plan as compress_plan
from tcexport.core import metadata, onnxfile
from tcexport.core.errors import UsageError
from tcexport.methods import registry
from tcexport.methods.base import Method, TokenState
from tcexport.methods.emit import Emitter, ir_dtype, typed_state
from tcexport.methods.params import REQUIRED, Param
from tcexport.methods.standalone import build_standalone_model
from tcexport.recipes import loading


class EveryKth(Method):
    """Keep every STRIDE-th unprotected token, starting at OFFSET (a method only this test registers)."""

    name = "every-kth"
    family = "test only"
    needs = frozenset()
    parameters = (Param("stride", int, "keep one unprotected token in every STRIDE", default=REQUIRED, low=1,
                        example=2),
                  Param("offset", int, "index of the first kept unprotected token", default=0, low=0),
                  Param("reverse", bool, "lay the kept tokens out last to first", default=False))

    @classmethod
    def check_more(cls, params):
        if params["offset"] >= params["stride"]:
            raise UsageError(f"every-kth offset must be below stride ({params['stride']}); got {params['offset']}")
        return params

    def indices(self, n_in: int, protected: int) -> np.ndarray:
        kept = np.arange(protected + self.params["offset"], n_in, self.params["stride"], dtype=np.int64)
        if self.params["reverse"]:
            kept = kept[::-1]
        return np.concatenate([np.arange(protected, dtype=np.int64), kept])

    def tokens_out(self, n_in: int, protected: int) -> int:
        return len(self.indices(n_in, protected))

    def reference(self, x, metric, size, mask, protected, signals=None) -> TokenState:
        index = torch.from_numpy(self.indices(x.shape[1], protected))
        return TokenState(x[:, index], size[:, index], None if mask is None else mask[:, index])

    def build_onnx(self, op, x, metric, size, mask, n_in, protected, name_prefix="every_kth", signals=None):
        g = Emitter(op, name_prefix, np.dtype(ir_dtype(x).numpy()))
        index = g.i64("kept", self.indices(n_in, protected))
        x_new = g.op("x_out", "Gather", x, index, axis=1)
        size_new = g.op("size_out", "Gather", size, index, axis=1)
        mask_new = None if mask is None else g.op("mask_out", "Gather", mask, index, axis=1)
        return typed_state(x_new, size_new, mask_new, TokenState(x, size, mask), self.tokens_out(n_in, protected))


@pytest.fixture
def every_kth():
    registry.register(EveryKth)
    yield EveryKth
    registry.unregister(EveryKth.name)


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_the_method_is_not_there_without_registering():
    assert "every-kth" not in registry.METHODS
    assert "--stride" not in _invoke("compress", "--help").output


def test_compress_help_shows_its_options(every_kth):
    text = " ".join(_invoke("compress", "--help").output.split())
    assert "--stride INTEGER" in text and "every-kth: keep one unprotected token in every STRIDE" in text
    assert "--offset INTEGER" in text and "(a whole number >= 0, default 0)" in text
    assert "--reverse / --no-reverse" in text
    # The built-in methods' flags are generated the same way and keep their names.
    # keep/keep_count are per-layer lists for pdrop (keep=0.5,0.25@8,16), so their option takes text
    for flag in ("--r TEXT", "--keep TEXT", "--keep-count TEXT", "--fuse / --no-fuse", "--dominant INTEGER",
                 "--kernel INTEGER", "--seed INTEGER", "--grid TEXT"):
        assert flag in text, flag


def test_stage_text_reads_values_by_declaration(every_kth):
    name, params, layers = compress_plan.parse_stage("every-kth:stride=3,offset=1,reverse=true@0-1")
    assert (name, params, layers) == ("every-kth", {"stride": 3, "offset": 1, "reverse": True}, "0-1")
    stages = compress_plan.plan_stages(12, ["every-kth:stride=3@0-1", "tome:r=4@2"])
    assert [(s.block, s.method.name, s.method.params) for s in stages] == [
        (0, "every-kth", {"stride": 3, "offset": 0, "reverse": False}),
        (1, "every-kth", {"stride": 3, "offset": 0, "reverse": False}), (2, "tome", {"r": 4})]
    with pytest.raises(UsageError, match=r"every-kth stride must be a whole number >= 1; got 0"):
        compress_plan.plan_stages(12, ["every-kth:stride=0@0"])
    with pytest.raises(UsageError, match="every-kth offset must be below stride"):
        compress_plan.plan_stages(12, ["every-kth:stride=2,offset=2@0"])


def test_recipes_check_it(every_kth):
    base = "model: {spec: 'timm:vit_tiny_patch16_224'}\n"
    recipe = loading.parse(yaml.safe_load(base + "compress: {method: every-kth, params: {stride: 2}, layers: 3}"))
    assert recipe.compress.method == "every-kth" and recipe.compress.params == {"stride": 2}
    staged = loading.parse(yaml.safe_load(base + "compress: {stages: ['every-kth:stride=2@3', 'tome:r=4@5']}"))
    assert [s.method for s in staged.compress.stages] == ["every-kth", "tome"]
    with pytest.raises(UsageError, match=r"compress.params: every-kth stride must be a whole number >= 1"):
        loading.parse(yaml.safe_load(base + "compress: {method: every-kth, params: {stride: -1}}"))
    with pytest.raises(UsageError, match=r"unknown every-kth parameter\(s\) width; every-kth takes stride, offset"):
        loading.parse(yaml.safe_load(base + "compress: {method: every-kth, params: {stride: 2, width: 3}}"))


@pytest.mark.parametrize("n, protected", [(197, 1), (12, 0), (9, 2)])
@pytest.mark.parametrize("params", [{"stride": 2}, {"stride": 3, "offset": 2, "reverse": True}])
def test_its_onnx_builder_matches_its_reference(every_kth, n, protected, params):
    method = EveryKth(**params)
    model = build_standalone_model(method, n, 8, 4, protected, True, name_prefix="tc_blk0_every-kth")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, n, 8)).astype(np.float32)
    size = rng.integers(1, 4, (2, n, 1)).astype(np.float32)
    mask = (rng.random((2, n)) > 0.2).astype(np.float32)
    names = [i.name for i in session.get_inputs()]
    feeds = {k: v for k, v in zip(("x", "size", "mask"), (x, size, mask)) if k in names}
    got = session.run(None, feeds)
    want = method.reference(torch.from_numpy(x), None, torch.from_numpy(size), torch.from_numpy(mask), protected)
    for actual, expected in zip(got, want):
        np.testing.assert_array_equal(actual, expected.numpy())


def test_compress_and_validate_a_vit_with_it(every_kth, vit_onnx, tmp_path):
    out = tmp_path / "vit_every_kth.onnx"
    result = _invoke("compress", vit_onnx, "--method", "every-kth", "--stride", "2", "--offset", "1",
                     "--layers", "3,8", "-o", out)
    assert result.exit_code == 0, result.output
    assert "197 -> 197 -> 197 -> 99 -> 99 -> 99 -> 99 -> 99 -> 50" in result.output
    record = metadata.read(onnxfile.load(out), metadata.COMPRESSION)
    assert record["methods"] == ["every-kth", "every-kth"] and record["params"][0] == {
        "stride": 2, "offset": 1, "reverse": False}
    checked = _invoke("validate", out, "--samples", "1", "--batch", "2")
    assert checked.exit_code == 0, checked.output
    staged = tmp_path / "vit_staged.onnx"
    result = _invoke("compress", vit_onnx, "--stage", "every-kth:stride=2,reverse=true@2", "--stage", "tome:r=8@5",
                     "-o", staged)
    assert result.exit_code == 0, result.output
    assert _invoke("validate", staged, "--samples", "1", "--batch", "2").exit_code == 0


def test_generic_checks_apply_to_every_declaration(every_kth):
    with pytest.raises(UsageError, match=r"every-kth needs --stride \(keep one unprotected token in every STRIDE\), "
                                         r"e.g. --stride 2"):
        EveryKth()
    for bad in (1.5, "2", True):
        with pytest.raises(UsageError, match="every-kth stride must be a whole number >= 1"):
            EveryKth(stride=bad)
    with pytest.raises(UsageError, match="every-kth reverse must be true or false; got 1"):
        EveryKth(stride=2, reverse=1)
    assert EveryKth(stride=np.int64(4)).params == {"stride": 4, "offset": 0, "reverse": False}


def test_declarations_that_cannot_work_are_refused_at_registration(every_kth):
    class Twice(EveryKth):
        name = "twice"
        parameters = (Param("a", int, "x"), Param("a", float, "y"))

    class Clash(EveryKth):
        name = "clash"
        parameters = (Param("layers", int, "collides with --layers"),)

    class Kind(EveryKth):
        name = "kind"
        parameters = (Param("stride", complex, "not a kind a CLI or a recipe can carry"),)

    class OtherStride(EveryKth):  # two methods share a parameter name only with one type: one CLI option
        name = "other-stride"
        parameters = (Param("stride", float, "a float stride"),)

    for cls, message in ((Twice, "declares a parameter twice"), (Clash, "'layers' is a compress plan option"),
                         (Kind, "kind must be one of int, float, bool, str"),
                         (OtherStride, "stride is float, but method 'every-kth' declares it int")):
        with pytest.raises(TypeError, match=message):
            registry.register(cls)
        assert cls.name not in registry.METHODS


def test_readme_method_table_is_the_registry():
    from pathlib import Path

    from tcexport.methods import table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table.replace_in(readme) == readme, "README's methods table is stale: run scripts/method_table.py"
    assert table.markdown() in readme


def test_a_registered_method_gets_its_row(every_kth):
    from tcexport.methods import table

    row = [line for line in table.markdown().splitlines() if line.startswith("| `every-kth` |")]
    assert row == ["| `every-kth` | test only | Keep every STRIDE-th unprotected token, starting at OFFSET (a method "
                   "only this test registers). | `--stride`, `--offset`, `--reverse/--no-reverse` |"]
