"""Decoder methods on every class of the decoder zoo (issue 19): fastv, pdrop, snapkv and streaming each compress
and validate against transformers' own forward under the same stages, or are refused in one line where the
combination cannot be right (a cache method on sliding-window layers). Sliding-window layers after a prefill
stage keep their window over the kept tokens' original positions, in the graph and the reference alike.

Llama with fastv takes the default run; every other cell is `slow` (tens of seconds each).
scripts/decoder_matrix.py runs the same cells for docs/models.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from tcexport.models import decoder_zoo
from tests.conftest import assert_usage_error, exported, made_once, run_cli

# The cells scripts/decoder_matrix.py runs (validate's prompts are 17-40 tokens: snapkv 6 + 4 fits).
METHOD_ARGS = {
    "fastv": lambda layers: ["--method", "fastv", "--keep", "0.5", "--layers", "0"],
    "pdrop": lambda layers: ["--stage", "pdrop:keep=0.5,0.25@0,1" if layers >= 3 else "pdrop:keep=0.5@0"],
    "snapkv": lambda layers: ["--method", "snapkv", "--budget", "6", "--window", "4"],
    "streaming": lambda layers: ["--method", "streaming", "--sink", "2", "--window", "6"],
}
CACHE_METHODS = ("snapkv", "streaming")
FAST = {("llama", "fastv")}
CELLS = [pytest.param(kind, method, id=f"{kind}-{method}",
                      marks=[] if (kind, method) in FAST else [pytest.mark.slow])
         for kind in decoder_zoo.KINDS for method in METHOD_ARGS]


def expected_refusal(kind: str, method: str) -> str | None:
    """The words of the refusal line a cell gives, or None when it must validate."""
    if kind in decoder_zoo.WINDOWED_KINDS and method in CACHE_METHODS:
        return f"{method}: layer"
    return None


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "decoder_zoo", decoder_zoo.tokenizer_dir)


def zoo_onnx(tmp_path_factory, zoo_root: Path, kind: str) -> Path:
    """The kind's export, made once per run (the same names as tests/test_decoder_export.py, so shared)."""
    made_once(tmp_path_factory, f"decoder_zoo_{kind}", lambda _: decoder_zoo.decoder_dir(kind, zoo_root))
    directory = decoder_zoo.decoder_dir(kind, zoo_root)
    return exported(tmp_path_factory, f"decoder_onnx_{kind}", f"hf:{directory}", f"{kind}.onnx")


@pytest.mark.parametrize("kind, method", CELLS)
def test_method_validates_or_is_refused_on_every_class(tmp_path_factory, zoo_root, tmp_path, kind, method):
    source = zoo_onnx(tmp_path_factory, zoo_root, kind)
    layers = decoder_zoo.decoder_config(kind).num_hidden_layers
    out = tmp_path / "c.onnx"
    result = run_cli("compress", source, "-o", out, *METHOD_ARGS[method](layers))
    refusal = expected_refusal(kind, method)
    if refusal is not None:
        assert_usage_error(result)
        line = result.stderr.strip()
        assert refusal in line and "sliding window of 8 positions" in line, line
        assert list(tmp_path.iterdir()) == []
        return
    assert result.returncode == 0, result.stderr
    report_path = tmp_path / "report.json"
    validated = run_cli("validate", out, "--json", report_path)
    report = json.loads(report_path.read_text())
    assert validated.returncode == 0 and report["passed"], validated.stdout + validated.stderr
    assert all(s["prefill_logits_max_abs"] <= report["atol"] for s in report["samples"])
    assert all(r["tokens_equal"] for s in report["samples"] for r in s["rows"]), report
    last = report["samples"][-1]
    lengths = last["cache_lengths"]
    whole = max(last["prompt_lengths"]) + report["new_tokens"] - 1  # the longest row's positions, uncompressed
    keys = {int(name.split(".")[1]): n for name, n in lengths.items() if name.endswith(".key")}
    windowed = {i for i, w in _windows(source).items() if w is not None}
    full = [n for i, n in keys.items() if i not in windowed]
    if method in ("fastv", "pdrop"):
        # layer 0 keeps the whole prompt; the last layer sees the kept tokens only (a window holds window - 1)
        assert keys[0] == (decoder_zoo.SLIDING_WINDOW - 1 if 0 in windowed else whole), keys
        final = layers - 1
        assert keys[final] < whole and (final not in windowed or keys[final] == decoder_zoo.SLIDING_WINDOW - 1), keys
        assert any(name.startswith("past_positions.") for name in lengths), lengths
    elif method == "snapkv":
        assert set(full) == {6 + 4 + report["new_tokens"] - 1}, keys  # budget + window, then the decode steps
    else:
        assert set(full) == {2 + 6}, keys  # trimmed to sink + window - 1, then the last step's token


def _windows(path: Path) -> dict:
    from tcexport.graph import decoder_prune

    return decoder_prune.windows_of(onnx.load(path))


@pytest.mark.parametrize("kind", [pytest.param(k, marks=[] if k == "llama" else [pytest.mark.slow])
                                  for k in decoder_zoo.KINDS])
def test_windows_are_read_off_the_graph(tmp_path_factory, zoo_root, kind):
    windows = _windows(zoo_onnx(tmp_path_factory, zoo_root, kind))
    config = decoder_zoo.decoder_config(kind)
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"]
        * config.num_hidden_layers)
    assert windows == {i: decoder_zoo.SLIDING_WINDOW if t == "sliding_attention" else None
                       for i, t in enumerate(types)}


@pytest.mark.slow
def test_a_window_reaching_into_the_span_keeps_original_positions(tmp_path_factory, zoo_root, tmp_path):
    """Mistral (every layer windowed, 8 slots): with the span reaching into the last token's window, pruned tokens
    are ones its window would see, so the graph's window must be over original positions to match the reference
    (by index, the last query would see kept tokens more than 8 slots back)."""
    source = zoo_onnx(tmp_path_factory, zoo_root, "mistral")
    out = tmp_path / "c.onnx"
    result = run_cli("compress", source, "-o", out, "--method", "fastv", "--keep", "0.3", "--layers", "0",
                     "--span", "2:-1")
    assert result.returncode == 0, result.stderr
    validated = run_cli("validate", out, "--json", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert validated.returncode == 0 and report["passed"], validated.stdout + validated.stderr
    # the stage changed what the model computes (so the match is not the uncompressed model's by accident)
    agreement = [r["agreement_with_uncompressed"] for s in report["samples"] for r in s["rows"]]
    assert min(agreement) < 1.0, agreement
