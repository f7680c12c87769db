"""Every sentence-transformers pooling mode stays what it means after compression (reference/pooling.py defines each
after a compression, graph/pooling.py makes the rewritten graph compute the same).

The export records the pipeline's real pooling; the reference pools as sentence-transformers does before any
compression and by the compressed tokens after one; each mode's pipeline compresses with tome and topk and
validates, and so does one pooling with all six modes concatenated (where the scale of each part counts: Normalize
cannot hide it); what cannot be kept is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from tcexport.compress import rewrite as compress
from tcexport.core import metadata
from tcexport.models import sources, zoo
from tcexport.models.pooling import MODES
from tcexport.reference import compressed_reference
from tcexport.reference import pooling as ref_pooling
from tcexport.reference.flow import TokenFlow
from tcexport.validate import equality as validate
from tests.conftest import assert_usage_error, cli_here, exported, made_once, run_cli

SEQ = 16
# What shows in the rewritten graph that the mode's mechanism took part (graph/pooling.py, graph/insert.py).
MARKS = {"cls": "token_index", "lasttoken": "token_index", "weightedmean": "position_term", "max": "tokens_shape",
         "mean": "_tokens", "mean_sqrt_len_tokens": "_tokens"}
METHODS = {"tome": {"r": "2"}, "topk": {"params": {"keep": 0.7}}}


def _modes(pooling) -> tuple[str, ...]:
    return (pooling,) if isinstance(pooling, str) else tuple(pooling)


def _name(pooling, include_prompt: bool) -> str:
    return "st_pool_" + "_".join(_modes(pooling)) + ("" if include_prompt else "_no_prompt")


def st_pipeline(tmp_path_factory, pooling, include_prompt: bool = True) -> Path:
    """The zoo's tiny BERT pipeline with this pooling, written once per test run."""
    def make(directory: Path) -> None:
        zoo.st_dir("bert", directory, pooling=pooling, include_prompt=include_prompt)

    root = made_once(tmp_path_factory, _name(pooling, include_prompt), make)
    return zoo.st_dir("bert", root, pooling=pooling, include_prompt=include_prompt)


def st_onnx(tmp_path_factory, pooling, include_prompt: bool = True) -> Path:
    directory = st_pipeline(tmp_path_factory, pooling, include_prompt)
    name = _name(pooling, include_prompt)
    return exported(tmp_path_factory, f"onnx_{name}", f"st:{directory}", f"{name}.onnx", seq_len=SEQ)


def _padded_batch(lengths: list[int], count: int, width: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), count, width, generator=generator)
    mask = torch.tensor([[1] * n + [0] * (count - n) for n in lengths])
    return x, mask


# ---------------------------------------------------------------------------------------------- provenance


@pytest.mark.parametrize("pooling", [*MODES, MODES], ids=[*MODES, "all"])
def test_the_export_records_the_pipelines_real_pooling(tmp_path_factory, pooling):
    source = sources.load(f"st:{st_pipeline(tmp_path_factory, pooling)}", seq_len=SEQ)
    assert source.info["pooling"] == list(_modes(pooling))
    assert source.info["pooling_include_prompt"] is True


def test_the_export_records_include_prompt(tmp_path_factory):
    source = sources.load(f"st:{st_pipeline(tmp_path_factory, 'mean', include_prompt=False)}", seq_len=SEQ)
    assert source.info["pooling"] == ["mean"]
    assert source.info["pooling_include_prompt"] is False


# ---------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("pooling", [*MODES, MODES], ids=[*MODES, "all"])
def test_the_uncompressed_reference_pools_as_sentence_transformers_encodes(tmp_path_factory, pooling):
    from sentence_transformers import SentenceTransformer

    directory = st_pipeline(tmp_path_factory, pooling)
    source = sources.load(f"st:{directory}", seq_len=SEQ)
    reference = compressed_reference(source, {})
    pipeline = SentenceTransformer(str(directory), device="cpu")
    texts = ["a short one", "a somewhat longer sentence to pool over", "three more words"]
    batch = pipeline.tokenizer(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
    assert batch["attention_mask"].sum(dim=1).max() < SEQ  # every row padded, so padding must be left out
    with torch.no_grad():
        ours = reference(batch["input_ids"], batch["attention_mask"])
    theirs = torch.from_numpy(pipeline.encode(texts))  # padded to the longest text only
    assert ours.shape == (3, zoo.WIDTH * len(_modes(pooling)))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("pooling", [*MODES, MODES], ids=[*MODES, "all"])
def test_compressed_pooling_of_an_uncompressed_state_is_the_modules_own(pooling):
    """The per-mode formulas used after a compression, given tokens that are each themselves (size 1, at their own
    position), are sentence-transformers' Pooling exactly: padding, an all-padding row, concatenation included."""
    from sentence_transformers.models import Pooling

    module = Pooling(8, pooling)
    x, mask = _padded_batch([6, 3, 1, 0], 6)
    flow = TokenFlow({}, 1, True)
    flow.begin(mask.to(torch.float32))
    flow.start(4, 6, x.device)
    ours = ref_pooling.pool(module, {"token_embeddings": x}, flow)["sentence_embedding"]
    theirs = module({"token_embeddings": x, "attention_mask": mask})["sentence_embedding"]
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # max over a row of padding only: -inf, as theirs
    finite = ~torch.isinf(theirs)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-6)


class _CompressedState:
    """What pool() reads of a TokenFlow, set by hand: tokens that merged, moved and padded."""

    pool_weights = TokenFlow.pool_weights

    def __init__(self, size, mask, positions, input_mask):
        self.size, self.mask, self._positions, self.input_mask = size, mask, positions, input_mask
        self.n0, self.plan = input_mask.shape[1], {}

    def positions(self):
        return self._positions


def test_after_a_compression_each_mode_reads_the_compressed_tokens():
    from sentence_transformers.models import Pooling

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    # Row 0: 9 real input tokens, now 5 real tokens of sizes 1, 2, 1, 3, 2 standing at positions 0, 4, 8, 2, 6.
    # Row 1: 4 real and 5 padding: real tokens 0, 1, 3 (sizes 1, 2, 1 at 0, 1, 3), padding 2 and 4 (sizes 3, 2).
    size = torch.tensor([[1.0, 2, 1, 3, 2], [1, 2, 3, 1, 2]])[..., None]
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 1, 0]])
    positions = torch.tensor([[0, 4, 8, 2, 6], [0, 1, 4, 3, 6]])
    input_mask = torch.tensor([[1.0] * 9, [1.0] * 4 + [0.0] * 5])
    state = _CompressedState(size, mask, positions, input_mask)
    pooled = ref_pooling.pool(Pooling(8, MODES), {"token_embeddings": x}, state)["sentence_embedding"]
    parts = dict(zip(MODES, pooled.split(8, dim=-1)))

    w = size[..., 0] * mask
    assert torch.allclose(parts["cls"], x[:, 0])  # the protected CLS token stays first
    assert torch.allclose(parts["lasttoken"], torch.stack([x[0, 2], x[1, 3]]))  # largest real position, times 1
    assert torch.allclose(parts["max"], torch.stack([x[0].amax(0), x[1, [0, 1, 3]].amax(0)]))  # padding left out
    total = (x * w[..., None]).sum(1)
    assert torch.allclose(parts["mean"], total / w.sum(1, keepdim=True))  # size-weighted: /9 and /4
    assert torch.allclose(parts["mean_sqrt_len_tokens"], total / w.sum(1, keepdim=True).sqrt())
    weights = w * (positions + 1)  # each token weighted as its largest constituent's position, times its size
    assert torch.allclose(parts["weightedmean"], (x * weights[..., None]).sum(1) / weights.sum(1, keepdim=True))


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_compresses_and_validates(tmp_path_factory, tmp_path, mode, method):
    model = st_onnx(tmp_path_factory, mode)
    source = metadata.read(onnx.load(str(model), load_external_data=False), metadata.SOURCE)
    assert source["info"]["pooling"] == [mode]
    out = tmp_path / "c.onnx"
    schedule = compress.compress_file(model, out, method=method, **METHODS[method])
    assert schedule[-1]["out"] < schedule[0]["in"]
    report = validate.validate(out, samples=2)
    assert report.passed, validate.format_report(report)
    names = [node.name for node in onnx.load(str(out), load_external_data=False).graph.node]
    assert any(MARKS[mode] in name for name in names), MARKS[mode]  # the mode's own rule took part


@pytest.mark.parametrize("method,options", [("tome", {"r": "5"}), ("topk", {"params": {"keep": 0.6}})],
                         ids=["tome", "topk"])
def test_all_modes_concatenated_compress_and_validate(tmp_path_factory, tmp_path, method, options):
    """Concatenated, each part keeps its scale (a weighted mean's denominator, the picked token times 1, not its
    size), which a single mode followed by Normalize would hide. r=5 merges real tokens in every row."""
    model = st_onnx(tmp_path_factory, MODES)
    out = tmp_path / "c.onnx"
    compress.compress_file(model, out, method=method, **options)
    report = validate.validate(out, samples=3)
    assert report.passed, validate.format_report(report)
    names = [node.name for node in onnx.load(str(out), load_external_data=False).graph.node]
    assert all(any(mark in name for name in names) for mark in MARKS.values())


# ---------------------------------------------------------------------------------------------- refusals


def test_include_prompt_false_is_refused_in_one_line(tmp_path_factory, tmp_path):
    model = st_onnx(tmp_path_factory, "mean", include_prompt=False)
    result = cli_here("compress", model, "--r", "2", "-o", tmp_path / "c.onnx")
    assert_usage_error(result)
    assert "include_prompt=False" in result.stderr and "prompt length" in result.stderr
    assert not (tmp_path / "c.onnx").exists()


def test_a_positional_mode_with_the_query_method_is_refused_in_one_line(tmp_path_factory, tmp_path):
    model = st_onnx(tmp_path_factory, "lasttoken")
    result = cli_here("compress", model, "--method", "query", "--keep", "0.7", "-o", tmp_path / "c.onnx")
    assert_usage_error(result)
    assert "lasttoken pooling" in result.stderr and "query method" in result.stderr


def test_an_unknown_recorded_mode_is_refused_in_one_line(tmp_path_factory, tmp_path):
    model = onnx.load(str(st_onnx(tmp_path_factory, "mean")))
    source = metadata.read(model, metadata.SOURCE)
    source["info"]["pooling"] = ["mean", "attention"]  # a mode from a future sentence-transformers
    metadata.write(model, metadata.SOURCE, source)
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    result = cli_here("compress", edited, "--r", "2", "-o", tmp_path / "c.onnx")
    assert_usage_error(result)
    assert "'attention'" in result.stderr and "does not know" in result.stderr
