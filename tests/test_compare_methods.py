"""scripts/compare_methods.py --quick end to end: vit_tiny + MiniLM, every registered method at both budgets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tcexport import methods

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_methods.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_method_has_a_budget_config():
    script = load_script()
    missing = sorted(set(methods.encoder_methods()) - set(script.CONFIGS))
    assert not missing, f"add budget configs for {missing} to scripts/compare_methods.py CONFIGS"
    for name, by_target in script.CONFIGS.items():
        assert set(by_target) == set(script.TARGETS), name
        for target, specs in by_target.items():
            assert set(specs) == {"vision", "text"}, (name, target)


def test_budget_is_mean_tokens_over_blocks():
    script = load_script()
    # 3 blocks of 10 tokens; the middle one halves them: (10+10)/2 + (10+5)/2 + (5+5)/2 = 22.5 token-blocks.
    schedule = [{"block": 0, "in": 10, "out": 10}, {"block": 1, "in": 10, "out": 5}, {"block": 2, "in": 5, "out": 5}]
    got = script.budget(schedule)
    assert got["token_blocks"] == 22.5
    assert got["mean_tokens"] == 7.5
    assert got["reduction"] == pytest.approx(0.25)
    assert got["last_tokens"] == 5


@pytest.mark.slow
def test_quick_comparison(tmp_path, vit_onnx, minilm_onnx, capsys):
    script = load_script()
    out = tmp_path / "compare"
    results = script.main(["--quick", "--out", str(out), "--iters", "1", "--warmup", "0", "--batch", "1,2",
                           "--vision-onnx", str(vit_onnx), "--text-onnx", str(minilm_onnx)])
    printed = capsys.readouterr().out

    for name in ("table.md", "results.json", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["targets"] == list(script.TARGETS)
    table = (out / "table.md").read_text()
    assert "| uncompressed |" in table and "| uncompressed |" in printed

    registered = set(methods.encoder_methods())
    assert set(results["methods"]) == registered  # every registered method compared, none skipped as missing
    tolerance = results["tolerance_points"]
    assert tolerance == script.TOLERANCE_POINTS
    rows = {(r["method"], r["target"]): r for r in results["rows"]}
    assert set(rows) == {(m, t) for m in registered for t in script.TARGETS}
    for (name, target), row in rows.items():
        assert not row["skipped"], row["skipped"]
        assert f"| {name} | {target}% |" in table
        for kind in ("vision", "text"):
            achieved = 100 * row[f"achieved_{kind}"]
            assert abs(achieved - target) <= tolerance, (name, target, kind, achieved)
            budget = row[f"budget_{kind}"]
            assert budget["reduction"] == pytest.approx(1 - budget["mean_tokens"] / budget["tokens"])
        assert budget["tokens"] == 128 and budget["blocks"] == 6  # MiniLM at seq len 128
        assert row["budget_vision"]["tokens"] == 197 and row["budget_vision"]["blocks"] == 12
        assert 0 < row["cosine_min"] <= row["cosine_mean"] <= 1 + 1e-6, (name, target)
        assert 0 <= row["retrieval_top1"] <= 1
        assert row["gflops_vision"]["own"] < results["baseline"]["gflops_vision"]["own"]
        assert row["gflops_vision"]["inserted"] >= 0
        for batch in (1, 2):
            assert row["latency_ms"][batch] > 0 and row["speedup"][batch] > 0
        assert row["relative_latency"] == pytest.approx(1 / row["speedup"][1])
    assert not [n for n in results["notes"] if "more than" in n]  # no budget outside the tolerance
