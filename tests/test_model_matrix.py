"""scripts/model_matrix.py: one tiny model end to end, the budget rule, and --only errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tcexport.core.errors import UsageError
from tests.conftest import assert_usage_error

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "model_matrix.py"


def load_script():
    spec = importlib.util.spec_from_file_location("model_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_zoo_model_has_a_row_name():
    script = load_script()
    names = [e.name for e in script.entries(full=False)]
    assert len(names) == len(set(names))
    assert "vit_tiny_patch16_224" in names and "hf-whisper" in names and "st-mpnet" in names


def test_budgets_shrink_tokens_without_exceeding_tome_caps():
    script = load_script()
    tome = script.compress_params("tome", tokens=197, depth=12, protected=1)
    assert tome == {"method": "tome", "r": str(196 // 36)}
    assert script.compress_params("tome", tokens=17, depth=2, protected=1)["r"] == "2"  # (17-1)//6
    assert script.compress_params("adjacent", tokens=16, depth=2, protected=0) == {"method": "adjacent", "r": "2"}
    assert "adjacent" in script.MODALITY_METHODS["speech"]  # speech rows also try order-keeping merging
    topk = script.compress_params("topk", tokens=197, depth=12, protected=1)
    assert topk["layers"] == "3,6,9" and topk["params"] == {"keep": script.TOPK_KEEP}
    assert script.compress_params("topk", tokens=17, depth=2, protected=1)["layers"] == "0,1"


def test_unknown_only_name_is_a_usage_error(tmp_path):
    script = load_script()
    with pytest.raises(UsageError, match="no_such_model"):
        script.select(script.entries(full=False), "vit_tiny_patch16_224,no_such_model")
    result = subprocess.run([sys.executable, str(SCRIPT), "--only", "no_such_model", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert_usage_error(result)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_one_tiny_model_end_to_end(tmp_path):
    script = load_script()
    argv = ["--only", "vit_tiny_patch16_224", "--out", str(tmp_path), "--iters", "2", "--warmup", "1"]
    rows = script.main(argv)
    assert [r["method"] for r in rows] == list(script.METHODS)
    data = json.loads((tmp_path / "models.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert data["command"] == "python scripts/model_matrix.py " + " ".join(argv)
    markdown = (tmp_path / "models.md").read_text()
    assert f"`{data['command']}`" in markdown
    for row in rows:
        assert row["export"] == "ok" and row["compress"] == "ok", row
        assert row["tokens_in"] == 17 and row["tokens_out"] < 17
        assert row["validate"] == "passed" and row["max_rel"] <= 1e-4, row  # plain ViT: the baseline family
        assert row["speedup_b1"] > 0 and row["speedup_b4"] > 0
        assert row["flop_ideal_speedup"] > 1
        assert f"| {row['model']} | {row['family']} | {row['method']} | 17 → {row['tokens_out']} |" in markdown


def test_merge_replaces_the_rows_of_the_models_run_and_keeps_the_rest(tmp_path):
    """--merge: rows of the models run replace theirs (or join in matrix order); every other row, the base run's
    command and its header line (with any note on it) stay; the merged run is named in the header and the JSON."""
    script = load_script()
    order = [e.name for e in script.entries(full=False)]
    old = [{"model": "vit_tiny_patch16_224", "method": m, "family": "f", "tokens_in": 17, "tokens_out": 13} for m in ("tome", "topk")]
    old += [{"model": "hf-bert", "method": "tome", "family": "f", "tokens_in": 32, "tokens_out": 20, "validate": "passed"}]
    new = [{"model": "hf-t5", "method": "tome", "family": "t", "tokens_in": 32, "tokens_out": 20, "validate": "passed"},
           {"model": "vit_tiny_patch16_224", "method": "tome", "family": "f", "tokens_in": 17, "tokens_out": 13,
            "validate": "passed"}]
    merged = script.merge_rows(old, new, order)
    assert [(r["model"], r["method"]) for r in merged] == [("vit_tiny_patch16_224", "tome"), ("hf-bert", "tome"),
                                                           ("hf-t5", "tome")]
    assert merged[0]["validate"] == "passed" and merged[1] is old[2]
    assert order.index("hf-bert") < order.index("hf-t5")

    settings = {"size": "tiny", "when": "then"}
    script.write_outputs(old, tmp_path, "python scripts/model_matrix.py", settings)
    note = "Produced by `python scripts/model_matrix.py` (tiny configs, seeded weights; then; with a note)."
    md = tmp_path / "models.md"
    md.write_text(md.read_text().replace("Produced by `python scripts/model_matrix.py` (tiny configs, seeded "
                                         "weights; then).", note))
    existing, produced = script.read_existing(tmp_path)
    assert produced == note and existing["rows"] == old
    run = {"command": "python scripts/model_matrix.py --only hf-t5 --merge", "when": "now", "models": ["hf-t5"],
           "versions": {}}
    script.write_outputs(merged, tmp_path, existing["command"], existing["settings"], [run], produced)
    text = md.read_text()
    assert note in text and ("Rows merged in later (`--merge`; every other row is from the run above): `hf-t5` by "
                             "`python scripts/model_matrix.py --only hf-t5 --merge` (now).") in text
    assert "(17-32 tokens," in text and "3 of 3 rows validate." in text
    data = json.loads((tmp_path / "models.json").read_text())
    assert data["command"] == "python scripts/model_matrix.py" and data["merged"] == [run] and data["rows"] == merged


def test_merge_needs_only_and_a_matrix_to_merge_into(tmp_path):
    for argv, message in ((["--merge"], "give --only"), (["--only", "hf-t5", "--merge"], "not a model matrix")):
        result = subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(tmp_path)], capture_output=True,
                                text=True, timeout=300)
        assert_usage_error(result)
        assert message in result.stderr
        assert not list(tmp_path.iterdir())
