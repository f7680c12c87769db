"""Masks are structure, not data (graph/masks.py, reference/mode.py, validate/dependence.py).

A causal mask (transformers CLIPTextModel, SDPA is_causal) is refused by compress in one line, in the graph and in
the eager reference alike; a sliding window (ModernBERT's local layers, a constant band) is kept over the tokens'
original positions when a global block comes first, refused otherwise; and validate checks which inputs each output
depends on, so a mask broken on both sides fails (exit 1) even though the values agree."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from tcexport.compress import rewrite as compress
from tcexport.core.errors import UsageError, ValidationFailed
from tcexport.graph import masks, probe
from tcexport.graph.blocks import find_blocks
from tcexport.methods.tome import ToMe
from tcexport.models import sources, zoo
from tcexport.models.inputs import InputSpec
from tcexport.reference import compressed_reference
from tcexport.validate import dependence
from tcexport.validate import equality as validate
from tests.conftest import assert_usage_error, exported, made_once, run_cli

SEQ = 16
PY = "py:tests.fixtures.masked_encoders:"


# ---------------------------------------------------------------------------------------------- the rule


def _band(n: int, before: int, after: int) -> np.ndarray:
    offset = np.arange(n)[None, :] - np.arange(n)[:, None]
    return (offset >= -before) & (offset <= after)


def test_patterns_are_classified_by_what_they_allow():
    n = 8
    assert masks.classify(np.ones((2, n, n), bool), 0) is None  # global (padding is never in the probe)
    causal = masks.classify(np.tril(np.ones((2, n, n), bool)), 3)
    assert (causal.kind, causal.block, causal.before, causal.after) == (masks.CAUSAL, 3, n - 1, 0)
    assert "causal mask (each token sees only itself and earlier ones)" in causal.describe()
    local_causal = masks.classify(_band(n, 2, 0)[None], 0)
    assert local_causal.kind == masks.CAUSAL and "sliding-window" in local_causal.describe()
    window = masks.classify(np.stack([_band(n, 2, 1)] * 2), 0, node="add_7")
    assert (window.kind, window.before, window.after, window.kept) == (masks.WINDOW, 2, 1, True)
    assert window.describe().endswith("the 2 tokens before it and the 1 after it) at node 'add_7'")
    per_head = np.stack([_band(n, 2, 2), np.ones((n, n), bool)])
    assert masks.classify(per_head, 0).kind == masks.OTHER
    strided = np.ones((1, n, n), bool)
    strided[:, :, 1::2] = False
    strided[:, 1::2, 1::2] = True
    other = masks.classify(strided, 0)
    assert other.kind == masks.OTHER and not other.kept and "neither padding, causal nor" in other.describe()


def test_masked_logits_are_those_far_below_their_row():
    logits = np.array([[[0.5, -3.0, -1e4], [2.0, np.finfo(np.float32).min, -np.inf]]])
    assert masks.allowed_from_logits(logits).tolist() == [[[True, True, False], [True, False, False]]]


def test_refusals_name_the_block_and_what_it_does():
    n = 8
    causal = {i: masks.classify(np.tril(np.ones((1, n, n), bool)), i, node=f"add_{i}") for i in (1, 2)}
    masks.refuse_unkept(causal, [])  # nothing compressed
    masks.refuse_unkept(causal, [3])  # every causal block runs before the compression, on every token
    with pytest.raises(UsageError, match=r"^block 1 applies a causal mask .* at node 'add_1'; encoder token "
                                         "compression would let tokens see later ones: tcexport cannot compress "
                                         r"it yet$"):
        masks.refuse_unkept(causal, [1, 2])
    with pytest.raises(UsageError, match=r"^block 1 .* \(the plan compresses block 0, before it\)$"):
        masks.refuse_unkept(causal, [0])
    window = {1: masks.classify(_band(n, 2, 2)[None], 1)}
    masks.refuse_unkept(window, [0])  # block 0 attends globally: the window is kept
    masks.refuse_unkept(window, [1])
    with pytest.raises(UsageError, match="no block up to block 1 attends globally"):
        masks.refuse_unkept({0: masks.classify(_band(n, 2, 2)[None], 0), **window}, [1])


# ---------------------------------------------------------------------------------------------- dependence, alone


TOKENS = [InputSpec("input_ids", ["batch", 12], "int64", "token_ids", high=50)]


def _embed(feeds) -> np.ndarray:
    ids = feeds["input_ids"].astype(np.float64)
    return np.stack([np.sin(ids * (k + 1)) for k in range(4)], axis=-1)  # [B, N, 4]: one row per token


def _causal(feeds):  # row i = mean of tokens 0..i
    x = _embed(feeds)
    return {"out": np.cumsum(x, axis=1) / np.arange(1, x.shape[1] + 1)[None, :, None]}


def _merged(feeds, causal: bool):  # tokens 2k and 2k+1 merged; a correct merge keeps the causal mean of its first
    x = _embed(feeds)
    if causal:
        return {"out": _causal(feeds)["out"][:, ::2]}
    return {"out": np.repeat(x.mean(axis=1, keepdims=True), x.shape[1] // 2, axis=1)}  # the mask lost: global


def test_dependence_passes_a_causal_model_that_stayed_causal_and_fails_one_that_did_not():
    positions = lambda feeds: np.arange(0, 12, 2)  # noqa: E731 - each merged token stands at its first token
    kept = dependence.check(TOKENS, ["out"], _causal, lambda f: _merged(f, True), positions, protected=1)
    assert kept.status == dependence.PASSED
    result = kept.outputs["out"]
    assert result["rows_checked"] == 6 and result["matched_by"] == "each token's original position"
    assert result["independent"]["input_ids tokens 9-11"] == 5  # rows at 0, 2, .., 8 never see tokens 9-11
    broken = dependence.check(TOKENS, ["out"], _causal, lambda f: _merged(f, False), positions, protected=1)
    assert broken.failed
    appeared = broken.outputs["out"]["appeared"]
    assert {(f["original_row"], f["perturbed"]) for f in appeared} >= {(0, "input_ids tokens 9-11"),
                                                                       (0, "input_ids token 6")}
    assert all(f["uncompressed_change"] == 0 and f["compressed_change"] > dependence.CHANGED for f in appeared)
    text = "\n".join(dependence.format_lines(broken))
    assert "row 0 (original row 0) now depends on input_ids tokens 9-11" in text


def test_dependence_that_vanished_fails_and_pooled_outputs_are_not_applicable():
    def cut(feeds):  # the late tokens no longer reach any row
        x = _embed(feeds)
        return {"out": _causal({"input_ids": np.where(np.arange(12) < 9, feeds["input_ids"], 0)})["out"],
                "pooled": x.mean(axis=1)}

    def whole(feeds):
        return {**_causal(feeds), "pooled": _embed(feeds).mean(axis=1)}

    report = dependence.check(TOKENS, ["out", "pooled"], whole, cut, lambda feeds: None, protected=1)
    assert report.failed and report.outputs["out"]["vanished"] and not report.outputs["out"]["appeared"]
    assert report.outputs["pooled"]["status"] == dependence.NOT_APPLICABLE
    assert "vacuous" in report.outputs["pooled"]["why"]
    unchanged = dependence.check(TOKENS, ["pooled"], whole, whole, lambda feeds: None, protected=1)
    assert unchanged.status == dependence.NOT_APPLICABLE


def test_images_are_perturbed_in_their_last_rows():
    spec = InputSpec("pixel_values", ["batch", 3, 32, 32], "float32", "float")
    assert dependence.token_axis(spec, (1, 3, 32, 32)) == 2
    assert dependence.token_axis(spec, (1, 8, 32)) == 2  # a spectrogram: time
    feeds = {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}
    changed = dependence.perturb(feeds, [spec], (24, 32), 32, seed=0)["pixel_values"] != 0
    assert changed[:, :, 24:].all() and not changed[:, :, :24].any()


# ---------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def clip_text_onnx(tmp_path_factory):
    return _zoo_export(tmp_path_factory, "clip_text")


@pytest.fixture(scope="module")
def modernbert_onnx(tmp_path_factory):
    return _zoo_export(tmp_path_factory, "modernbert")


def _zoo_export(tmp_path_factory, kind: str):
    root = made_once(tmp_path_factory, f"zoo_hf_{kind}", lambda directory: zoo.hf_dir(kind, directory))
    return exported(tmp_path_factory, f"onnx_hf_{kind}_masks", f"hf:{zoo.hf_dir(kind, root)}", f"{kind}.onnx",
                    seq_len=SEQ)


def _structures(path) -> dict:
    model = onnx.load(str(path))
    shapes = probe.concrete_shapes(model)
    return masks.find(model, find_blocks(ir.from_proto(model).graph, shapes))


def _source(path):
    from tcexport.core import metadata

    return sources.load_from_record(metadata.read(onnx.load(str(path), load_external_data=False), metadata.SOURCE))


@pytest.mark.parametrize("method", [["--method", "tome", "--r", "2"], ["--method", "topk", "--keep", "0.7"]])
def test_clip_text_compress_is_refused_in_one_line(clip_text_onnx, tmp_path, method):
    out = tmp_path / "clip.tc.onnx"
    result = run_cli("compress", clip_text_onnx, *method, "-o", out)
    assert_usage_error(result)
    assert "error: block 0 applies a causal mask (each token sees only itself and earlier ones) at node " \
           in result.stderr and "would let tokens see later ones: tcexport cannot compress it yet" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_clip_text_masks_are_found_in_the_graph_and_the_reference(clip_text_onnx):
    found = _structures(clip_text_onnx)
    assert sorted(found) == [0, 1] and {s.kind for s in found.values()} == {masks.CAUSAL}
    assert all(s.node and s.before == SEQ - 1 and s.after == 0 for s in found.values())
    source = _source(clip_text_onnx)
    with pytest.raises(UsageError, match="^block 0 applies a causal mask"):
        compressed_reference(source, {0: ToMe(r=2)})
    reference = compressed_reference(source, {})  # uncompressed: nothing to refuse, the masks are still found
    assert {i: s.kind for i, s in reference.layout.masks.items()} == {0: masks.CAUSAL, 1: masks.CAUSAL}


def test_sdpa_is_causal_is_refused_on_both_sides(tmp_path_factory, tmp_path):
    model = exported(tmp_path_factory, "py_causal", PY + "causal_encoder", "causal.onnx", seq_len=SEQ)
    assert {s.kind for s in _structures(model).values()} == {masks.CAUSAL}
    with pytest.raises(UsageError, match="^block 0 applies a causal mask"):
        compress.compress_file(model, tmp_path / "c.onnx", method="tome", r="2")
    with pytest.raises(UsageError, match="^block 1 applies a causal mask"):
        compressed_reference(_source(model), {1: ToMe(r=2)})
    assert not (tmp_path / "c.onnx").exists()


def test_windowed_encoder_without_a_global_block_is_refused(tmp_path_factory, tmp_path):
    model = exported(tmp_path_factory, "py_windowed", PY + "windowed_encoder", "windowed.onnx", seq_len=SEQ)
    found = _structures(model)
    assert [(s.kind, s.before, s.after) for s in found.values()] == [(masks.WINDOW, 3, 3)] * 2
    with pytest.raises(UsageError, match="^block 0 applies a sliding-window mask .* no block up to block 0 attends "
                                         "globally"):
        compress.compress_file(model, tmp_path / "c.onnx", method="topk", params={"keep": 0.7})
    assert not (tmp_path / "c.onnx").exists()


def test_constant_window_after_a_global_block_follows_the_tokens(tmp_path_factory, tmp_path):
    model = exported(tmp_path_factory, "py_global_window", PY + "global_then_windowed_encoder", "gw.onnx",
                     seq_len=SEQ)
    out = tmp_path / "c.onnx"
    compress.compress_file(model, out, method="tome", r="2")
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert any("position_term" in name for name in names)  # the band is gathered at the tokens' positions
    report = validate.validate(out, samples=2)
    assert report.passed and report.dependence.status == dependence.PASSED, validate.format_report(report)


@pytest.mark.parametrize("method, options", [("tome", {"r": "2"}), ("topk", {"params": {"keep": 0.7}})])
def test_modernbert_keeps_its_window_over_original_positions(modernbert_onnx, tmp_path, method, options):
    found = _structures(modernbert_onnx)
    assert list(found) == [1] and (found[1].kind, found[1].before, found[1].after) == (masks.WINDOW, 4, 4)
    out = tmp_path / "c.onnx"
    schedule = compress.compress_file(modernbert_onnx, out, method=method, **options)
    assert schedule[-1]["out"] < SEQ
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert any("attention_mask" in name and "window4_4" in name for name in names)
    report = validate.validate(out, samples=2)
    assert report.passed, validate.format_report(report)
    assert report.dependence.status == dependence.PASSED
    assert report.dependence.outputs["last_hidden_state"]["matched_by"] == "each token's original position"
    # The window took part: a reference that forgets it disagrees with the graph.
    source = _source(modernbert_onnx)
    plan, prop_attn = validate.plan_from_record(validate._records(validate.artifacts.resolve(out))[1])
    forgetful = compressed_reference(source, plan, prop_attn=prop_attn)
    forgetful.layout.masks.clear()
    import onnxruntime as ort

    feeds = validate.sample_feeds(source.inputs, 1, 1)
    actual = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    kept = compressed_reference(source, plan, prop_attn=prop_attn)
    with torch.no_grad():
        tensors = [torch.from_numpy(feeds[s.name]) for s in source.inputs]
        assert np.abs(kept(*tensors).numpy() - actual).max() < 1e-4
        assert np.abs(forgetful(*tensors).numpy() - actual).max() > 1e-3


def test_a_causal_mask_broken_on_both_sides_fails_validate_on_dependence(clip_text_onnx, tmp_path, monkeypatch,
                                                                          capsys):
    """The user's report: with the refusal skipped, the graph and the reference both rebuild the causal mask as a
    padding mask; the values agree, and only the dependence check sees that row 0 now depends on late tokens."""
    monkeypatch.setattr(masks, "refuse_unkept", lambda *args, **kwargs: None)
    out = tmp_path / "broken.onnx"
    compress.compress_file(clip_text_onnx, out, method="tome", r="2")
    report = validate.validate(out, samples=2)
    assert not report.numeric_failures and not report.diverged  # the values agree ...
    assert not report.passed and report.dependence.failed  # ... and validate fails all the same
    appeared = report.dependence.outputs["last_hidden_state"]["appeared"]
    assert any(f["row"] == 0 and f["original_row"] == 0 for f in appeared)  # the BOS row sees later tokens
    text = validate.format_report(report)
    assert "row 0 (original row 0) now depends on input_ids tokens" in text
    assert text.splitlines()[-1] == "FAILED: 0 numeric failure(s), 0 discrete divergence(s), dependence failed"
    from tcexport.cli import cli

    json_path = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exited:
        cli.main(["validate", str(out), "--samples", "2", "--json", str(json_path)])
    assert exited.value.code == 1
    assert "dependence failed" in capsys.readouterr().err
    assert json.loads(json_path.read_text())["dependence"]["status"] == "failed"


def test_plain_bert_compresses_and_validates_with_dependence_passed(bert_onnx, tmp_path):
    assert _structures(bert_onnx) == {}
    out = tmp_path / "bert.tc.onnx"
    compress.compress_file(bert_onnx, out, method="tome", r="2")
    report = validate.validate(out, samples=2)
    assert report.passed, validate.format_report(report)
    result = report.dependence.outputs["last_hidden_state"]
    assert report.dependence.status == dependence.PASSED and result["status"] == dependence.PASSED
    assert result["rows_checked"] > 0 and not result["appeared"] and not result["vanished"]
    assert report.to_json()["dependence"]["status"] == "passed"
    assert "last_hidden_state: passed" in validate.format_report(report)
