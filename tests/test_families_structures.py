"""Families with unusual attention or block structures, run as a user runs them (export -> compress -> validate):
each either compresses and validates, or is refused with exit 2 and one line that names what was found; none
gives a traceback, and none is told advice that does not apply (they were exported with the dynamo exporter at
opset 18 already).

Supported: timm parallel blocks (`vit_small_patch16_18x2_224`: two attentions summed into one residual) compress
as one block per pair, the metric from the first branch, every branch with proportional attention later.
Refused: LeViT, Funnel, MViTv2 (attention that pools tokens), CaiT (talking heads), XCiT (attention over channels),
DeBERTa-v2 (heads folded into the batch, disentangled position terms), WavLM (nn.MultiheadAttention-style keys),
MobileBERT (a bottleneck block: its input skips the compressed point), Longformer and block-sparse BigBird (no
attention over all tokens; their dynamo exports fail, the TorchScript one of Longformer only at a fixed batch).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tcexport.cli import cli as tcexport_cli
from tcexport.core.errors import UsageError
from tests.conftest import assert_usage_error, run_cli
from tests.families import export_zoo, has_node, spec_of

ADVICE_THAT_DOES_NOT_APPLY = ("re-export with the dynamo exporter", "opset <= 22", "windowed attention")


def invoke(*args) -> object:
    """`tcexport ARGS` in this process; an exception other than the CLI's own exit is a bug and is raised."""
    result = CliRunner().invoke(tcexport_cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_one_line_refusal(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    for advice in ADVICE_THAT_DOES_NOT_APPLY:
        assert advice not in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- parallel blocks


@pytest.mark.parametrize("method, options", [("tome", ["--r", "2"]), ("topk", ["--keep", "0.7"])])
def test_parallel_blocks_compress_and_validate(tmp_path_factory, tmp_path, method, options):
    import onnx

    model = export_zoo(tmp_path_factory, "timm", "vit_small_patch16_18x2_224")
    out = tmp_path / "c.onnx"
    result = invoke("compress", model, "--method", method, *options, "-o", out)
    assert result.exit_code == 0, result.output
    from tcexport.core import metadata

    compressed = onnx.load(str(out))
    schedule = metadata.read(compressed, metadata.TOKENS)
    assert [b["scope"] for b in schedule] == ["blocks.0", "blocks.1"]  # one block per pair of attentions
    assert schedule[0]["in"] == 17 and schedule[-1]["out"] < 17
    # block 1's second attention gets proportional attention too (without it validate fails: max rel ~0.5)
    assert has_node(compressed, "tc_blk1/prop_attn") and has_node(compressed, "tc_blk1_branch1/prop_attn")
    result = invoke("validate", out, "--samples", "2")
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output


def test_parallel_blocks_are_one_block_with_the_first_branch_keys(tmp_path_factory):
    import onnx
    import onnx_ir as ir

    from tcexport.graph import blocks, probe

    model = export_zoo(tmp_path_factory, "timm", "vit_small_patch16_18x2_224")
    proto = onnx.load(str(model))
    graph = ir.from_proto(proto).graph
    found = blocks.find_blocks(graph, probe.concrete_shapes(proto))
    assert len(found) == 2
    for block in found:
        assert len(block.softmaxes) == 2
        first, second = (blocks.node_scopes(s) for s in block.softmaxes)
        assert f"{block.scope}.attns.0" in first and f"{block.scope}.attns.1" in second
        assert block.softmax is block.softmaxes[0]  # metric and CLS attention from the first branch
        assert block.summary()["parallel_softmaxes"] == [block.branches[0].name]


# ---------------------------------------------------------------------------------------------- refused

TIMM_REFUSALS = {
    "levit_128s": ("'node_softmax_1' (stages.1.downsample.attn_downsample) attends from 4 queries to 16 keys, and "
                   "later blocks attend over its output", "pools tokens inside its attention"),
    "mvitv2_tiny": ("(stages.0.blocks.0.attn) attends from 64 queries to 4 keys", "pools tokens inside its attention"),
    "cait_xxs24_224": ("the logits are mixed across heads by a learned weight", "talking-heads attention"),
    "xcit_nano_12_p16_224": ("block 0 attends over a 32x32 matrix", "sums over the 16 tokens",
                             "attention between channels, not tokens"),
    "pit_ti_224": ("block 1 holds 17 tokens where block 0 holds 50", "a pooling layer between stages"),
}
HF_REFUSALS = {
    "mobilebert": ("adds its output to", "the block's input comes back only at",
                   "a bottleneck block, as in MobileBERT"),
    "deberta-v2": ("the logits are computed with the heads folded into the batch", "[4, 16, 16]",
                   "terms gathered by relative distance"),
    "funnel": ("(model.encoder.blocks.1.0.attention) attends from 8 queries to 16 keys",
               "pools tokens inside its attention"),
    "wavlm": ("the keys of attention Softmax", "with the heads folded into the batch"),
}


@pytest.mark.parametrize("family, kind", [("timm", k) for k in TIMM_REFUSALS] + [("hf", k) for k in HF_REFUSALS])
def test_structure_refusal_is_one_accurate_line(tmp_path_factory, tmp_path, family, kind):
    model = export_zoo(tmp_path_factory, family, kind)
    fragments = (TIMM_REFUSALS if family == "timm" else HF_REFUSALS)[kind]
    for method, options in (("tome", ["--r", "2"]), ("topk", ["--keep", "0.7"])):
        out = tmp_path / f"{method}.onnx"
        assert_one_line_refusal(invoke("compress", model, "--method", method, *options, "-o", out), *fragments)
        assert not out.exists()


def test_levit_refusal_from_the_command_line(tmp_path_factory, tmp_path):
    """The same refusal in a fresh process, as a user sees it: exit 2, one line, no traceback."""
    model = export_zoo(tmp_path_factory, "timm", "levit_128s")
    result = run_cli("compress", model, "--method", "tome", "--r", "2", "-o", tmp_path / "c.onnx")
    assert_usage_error(result)
    assert "pools tokens inside its attention" in result.stderr
    assert not (tmp_path / "c.onnx").exists()


def test_mobilebert_reference_refuses_instead_of_crashing(tmp_path_factory):
    """The eager reference finds the bottleneck too (a Python API user gets the reason, not a size mismatch)."""
    from tcexport import methods
    from tcexport.models import sources
    from tcexport.reference import compressed_reference

    spec, options = spec_of(tmp_path_factory, "hf", "mobilebert")
    source = sources.load(spec, **options)
    tome = methods.get("tome")
    for plan in ({0: tome(r=2)}, {1: tome(r=2)}, {0: tome(r=2), 1: tome(r=2)}):
        with pytest.raises(UsageError, match="a skip connection around the point where tcexport compresses"):
            compressed_reference(source, plan)


def test_a_skip_around_compressed_blocks_is_refused_by_graph_and_reference(tmp_path_factory, tmp_path):
    """Patch tokens added back after the blocks: the graph would otherwise gather them as a position term."""
    from tcexport import methods
    from tcexport.compress import rewrite
    from tcexport.models import sources
    from tcexport.reference import compressed_reference
    from tests.conftest import exported

    spec = "py:tests.fixtures.skip_models:long_skip_vit"
    model = exported(tmp_path_factory, "long_skip", spec, "long_skip.onnx", input_shape="3x32x32")
    for method, options in (("tome", {"r": "2"}), ("topk", {"params": {"keep": 0.7}})):
        with pytest.raises(UsageError, match="combines the compressed tokens with 'transpose', which is computed "
                                             "from the model input before the compression"):
            rewrite.compress_file(model, tmp_path / "c.onnx", method=method, **options)
        assert not (tmp_path / "c.onnx").exists()
    source = sources.load(spec, input_shape="3x32x32")
    with pytest.raises(UsageError, match="after block 1's residual add, an add joins what the block computed"):
        compressed_reference(source, {1: methods.get("tome")(r=2)})


# ---------------------------------------------------------------------------------------------- exporter paths


def _hf_spec(tmp_path_factory, kind: str) -> list[str]:
    spec, options = spec_of(tmp_path_factory, "hf", kind)
    return [spec, "--seq-len", str(options["seq_len"])]


def test_longformer_on_both_exporters(tmp_path_factory, tmp_path, monkeypatch):
    spec = _hf_spec(tmp_path_factory, "longformer")
    # dynamo: torch.export cannot trace its data-dependent global attention; one line naming that, and not the
    # partial graph torch.export prints on stderr when it fails (progress lines off: only the error is left)
    monkeypatch.setenv("TCEXPORT_PROGRESS", "off")
    result = run_cli("export", *spec, "-o", tmp_path / "d.onnx")
    assert_usage_error(result)
    assert "failed (GuardOnDataDependentSymNode: Could not guard on data-dependent expression" in result.stderr
    assert not (tmp_path / "d.onnx").exists()
    # TorchScript: the trace runs only at its example batch
    assert_one_line_refusal(invoke("export", *spec, "--exporter", "torchscript", "-o", tmp_path / "t.onnx"),
                            "fails in ONNX Runtime at batch 1 (InvalidArgument:", "Gather",
                            "the TorchScript trace keeps shapes of its example batch (2)", "fixed --batch N")
    assert not (tmp_path / "t.onnx").exists()
    # ... and at that batch it exports, and compress says what its attention is
    fixed = tmp_path / "t2.onnx"
    result = invoke("export", *spec, "--exporter", "torchscript", "--batch", "2", "--atol", "1e-3", "-o", fixed)
    assert result.exit_code == 0, result.output
    assert_one_line_refusal(invoke("compress", fixed, "--r", "2", "-o", tmp_path / "c.onnx"),
                            "none of the graph's 2 attention Softmax nodes is self-attention over the tokens",
                            "has logits [2, 16, 2, 9]")


def test_block_sparse_big_bird_on_both_exporters(tmp_path_factory, tmp_path):
    spec = _hf_spec(tmp_path_factory, "big_bird")
    assert_one_line_refusal(invoke("export", *spec, "-o", tmp_path / "d.onnx"), "export of hf:", "failed (")
    assert not (tmp_path / "d.onnx").exists()
    traced = tmp_path / "t.onnx"
    result = invoke("export", *spec, "--exporter", "torchscript", "-o", traced)
    assert result.exit_code == 0, result.output
    for method, options in (("tome", ["--r", "2"]), ("topk", ["--keep", "0.7"])):  # _check_caps met no block
        assert_one_line_refusal(invoke("compress", traced, "--method", method, *options, "-o", tmp_path / "c.onnx"),
                                "none of the graph's", "is self-attention over the tokens", "block_sparse")


def test_exporter_failures_are_named_by_their_cause():
    from torch.onnx._internal.exporter._errors import TorchExportError

    from tcexport.export import exporter

    try:
        try:
            raise RuntimeError("Could not guard on data-dependent expression Eq(u0, 1)\nmore detail")
        except RuntimeError as cause:
            raise TorchExportError("Failed to export the model with torch.export. This is step 1/3") from cause
    except TorchExportError as wrapped:
        assert exporter._reason(wrapped) == "RuntimeError: Could not guard on data-dependent expression Eq(u0, 1)"
    assert exporter._reason(ValueError("plain\nsecond")) == "ValueError: plain"


def test_exporter_output_is_muted_only_in_its_own_thread():
    """torch.export's stderr dump goes; the live progress line, drawn from its own thread, keeps ticking."""
    import io
    import sys
    import threading

    from tcexport.export import exporter

    sink, previous = io.StringIO(), sys.stderr
    sys.stderr = sink
    try:
        with exporter._quiet():
            print("partial graph", file=sys.stderr)
            thread = threading.Thread(target=lambda: print("progress", file=sys.stderr))
            thread.start()
            thread.join()
    finally:
        sys.stderr = previous
    assert sink.getvalue() == "progress\n"
