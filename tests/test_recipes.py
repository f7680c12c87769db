"""YAML recipes: schema errors (one line, exit 2, nothing written), the shipped recipes, and one end-to-end run."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from tcexport.core import progress
from tcexport.recipes import fields, loading, runner
from tcexport.core.errors import UsageError

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
GOOD = "model:\n  spec: timm:vit_tiny_patch16_224\n"

# Run through the CLI in a fresh process, as a user would: name -> (recipe text, words the one-line error must hold)
BAD_RECIPES = {
    "unknown_field": (GOOD + "  seqlen: 3\n", ["model.seqlen", "unknown field", "seq_len"]),
    "negative_r": (GOOD + "compress: {r: -1}\n", ["compress.r", "must be >= 0"]),
    "bad_layers_type": (GOOD + "compress: {r: 4, layers: {first: 1}}\n", ["compress.layers", "must be 'all'"]),
    "missing_spec": ("model:\n  seq_len: 8\n", ["model.spec", "required"]),
    "bad_method_params": (GOOD + "compress: {method: topk, params: {keep: 1.5}}\n",
                          ["compress.params", "topk keep must be a rate in (0, 1]"]),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad recipe in its own `python -m tcexport.cli build` process, all at once (each pays the torch import)."""
    work = tmp_path_factory.mktemp("bad_recipes")
    procs = {}
    for name, (text, _) in BAD_RECIPES.items():
        (work / name).mkdir()
        (work / name / "bad.yaml").write_text(text)
        procs[name] = subprocess.Popen([sys.executable, "-m", "tcexport.cli", "build", f"{name}/bad.yaml", "-o",
                                        f"{name}/out"], cwd=work, text=True, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return work, results


@pytest.mark.parametrize("name", list(BAD_RECIPES))
def test_bad_recipe_is_one_line_exit_2_and_writes_nothing(bad_runs, name):
    work, results = bad_runs
    result = results[name]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {name}/bad.yaml: "), lines[0]  # names the file, then the field
    for word in BAD_RECIPES[name][1]:
        assert word in lines[0], (word, lines[0])
    if name == "negative_r":
        assert lines[0] == "error: negative_r/bad.yaml: compress.r: must be >= 0 (got -1)"
    assert [p.name for p in (work / name).iterdir()] == ["bad.yaml"]  # no out, no temporary directory


# ---------------------------------------------------------------------------------------------- schema, in process


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = loading.load(path)
    assert recipe.name == path.stem
    assert recipe.compress is not None and recipe.validation is not None and recipe.bench is not None
    # The resolved form written into OUT_DIR/recipe.yaml is itself a valid recipe, equal to the original.
    again = loading.parse(yaml.safe_load(recipe.to_yaml()), "resolved")
    assert again.model_dump() == recipe.model_dump()


def test_the_expected_recipes_ship():
    assert {p.stem for p in SHIPPED} >= {"vit_b16_tome_r16", "deit_s_tome_r13", "minilm_tome", "vit_tiny_tome_r8",
                                         "vit_tiny_multistage", "minilm_topk"}
    multistage = loading.load(ROOT / "recipes" / "vit_tiny_multistage.yaml")
    assert multistage.compress.plan()["stages"] == ["tome:r=8@0-5", "topk:keep=0.7@6,9"]
    topk = loading.load(ROOT / "recipes" / "minilm_topk.yaml")
    assert topk.model.spec == "st:all-MiniLM-L6-v2" and topk.compress.method == "topk"
    assert topk.compress.plan() == dict(method="topk", r=None, layers="1,3", schedule="constant",
                                        params={"keep": 0.7}, prop_attn=True, impl="subgraph", protected=None)
    minilm = loading.load(ROOT / "recipes" / "minilm_tome.yaml")
    assert minilm.model.spec == "st:all-MiniLM-L6-v2" and minilm.model.seq_len == 128
    assert minilm.bench.batch == [1, 8]
    vit_b = loading.load(ROOT / "recipes" / "vit_b16_tome_r16.yaml")
    assert vit_b.model.seed == 0 and vit_b.compress.r == 16


@pytest.mark.parametrize("text, words", [
    ("model: {spec: 'timm:x', seed: true}", ["model.seed", "integer"]),
    ("model: {spec: foo}", ["model.spec", "unknown model spec"]),
    ("model: {spec: 'timm:x', pretrained: true, checkpoint: w.pth}", ["model:", "not both"]),
    ("model: {spec: 'timm:x'}\nvalidate: {atol: -1.0e-3}", ["validate.atol", "must be >= 0"]),
    ("model: {spec: 'timm:x'}\nbuild: {opt_level: max}", ["build.opt_level", "'all'"]),
    ("model: {spec: 'timm:x'}\nbuild: {backend: trt}", ["build.backend", "--backend trt"]),
    ("model: {spec: 'timm:x'}\nexport: {batch: 4}\nbench: {batch: [1, 8]}", ["bench.batch", "fixed batch of 4"]),
    ("model: {spec: 'timm:x'}\ncompress: {r: [1, 2], layers: 0-2}", ["compress", "2 values for 3"]),
    ("model: {spec: 'timm:x'}\ncompress: {r: 4, layers: 5-2}", ["compress.layers", "backwards"]),
    ("model: {spec: 'timm:x'}\nbench: {iters: 5, duration: 2}", ["bench", "not both"]),
    ("model: {spec: 'timm:x'}\nvalidation: {}", ["validation", "did you mean 'validate'"]),
    ("model: {spec: 'timm:x'}\ncompress: {r: [4, -2]}", ["compress.r", "must be >= 0 (got -2 at position 1)"]),
    ("model: {spec: 'timm:x'}\nmodel: {spec: 'timm:y'}", [":2:1: invalid YAML", "appears twice"]),
    # every registered method, its parameters checked by the method itself, reported at the recipe field
    ("model: {spec: 'timm:x'}\ncompress: {method: tpk, params: {keep: 0.7}}",
     ["compress.method: unknown method 'tpk' (did you mean 'topk'?); choose one of", "prune-merge", "query"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: topk, params: {keep: 1.5}}",
     ["compress.params: topk keep must be a rate in (0, 1]", "got 1.5"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: topk}", ["compress.params: topk needs keep", "keep_count"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: pool, params: {kernel: 2, size: 3}}",
     ["compress.params: unknown pool parameter(s) size"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: topk, params: [0.7]}", ["compress.params", "must be a mapping"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: topk, r: 8}", ["compress.r: topk takes no r", "compress.params"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: tome}", ["compress.r: tome needs r"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: adjacent, r: 4, params: {r: 4}}", ["compress.params", "twice"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: topk, params: {keep: 0.7}, schedule: decreasing}",
     ["compress.schedule: applies to tome only"]),
    ("model: {spec: 'timm:x'}\ncompress: {method: tome, r: 8, stages: ['tome:r=8@0-5']}",
     ["compress: give stages or method/r, not both"]),
    ("model: {spec: 'timm:x'}\ncompress: {layers: 0-5, stages: ['tome:r=8@0-5']}", ["compress:", "layers, not both"]),
    ("model: {spec: 'timm:x'}\ncompress: {stages: []}", ["compress.stages: must list at least 1 item"]),
    ("model: {spec: 'timm:x'}\ncompress: {stages: ['tome:r=8']}", ["compress.stages[0]: ", "METHOD:key=value"]),
    ("model: {spec: 'timm:x'}\ncompress: {stages: ['tome:r=8@0-5', 'topk:keep=2@6']}",
     ["compress.stages[1].params: topk keep must be a rate in (0, 1]"]),
    ("model: {spec: 'timm:x'}\ncompress: {stages: ['tome:r=8@0-5', {method: topk, lyers: 6, params: {keep: 0.5}}]}",
     ["compress.stages[1].lyers: unknown field (did you mean 'layers'?"]),
    ("model: {spec: 'timm:x'}\ncompress: {stages: [{method: magic, layers: 1}]}",
     ["compress.stages[0].method: unknown method 'magic'"]),
    ("model: {spec: 'timm:x'}\ncompress: {stages: ['tome:r=8@0-5', 'topk:keep=0.7@5,9']}",
     ["compress.stages: block 5 is in stage 0 and stage 1"]),
    ("model:\n  spec: [timm:x", ["invalid YAML"]),
    ("", ["the recipe is empty"]),
    ("- model", ["must be a mapping"]),
])
def test_schema_errors_name_the_field(tmp_path, text, words):
    path = tmp_path / "r.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError) as info:
        loading.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_method_params_and_stage_forms():
    """compress.params pass through to compress_file; a stage is text or a mapping, run as text."""
    recipe = loading.parse(yaml.safe_load(GOOD + "compress: {method: topk, params: {keep: 0.7, fuse: true, "
                                                 "keep-order: true}, layers: [3, 6]}"))
    plan = recipe.compress.plan()
    assert plan["method"] == "topk" and plan["layers"] == "3,6" and plan["r"] is None
    assert plan["params"] == {"keep": 0.7, "fuse": True, "keep_order": True}
    assert loading.parse(yaml.safe_load(GOOD + "compress: {method: adjacent, r: 4}")).compress.plan()["r"] == "4"
    assert loading.parse(yaml.safe_load(GOOD + "compress: {r: [4, 8], layers: 0-1}")).compress.plan()["r"] == "4,8"

    text = GOOD + """compress:
  stages:
    - tome:r=8@0-5
    - {method: topk, layers: "6,9", params: {keep: 0.7, fuse: true}}
    - {method: pool, layers: 10, params: {kernel: 2, grid: 1d}}
  impl: function
"""
    recipe = loading.parse(yaml.safe_load(text))
    stages = recipe.compress.plan()
    assert stages == {"stages": ["tome:r=8@0-5", "topk:keep=0.7,fuse=true@6,9", "pool:kernel=2,grid=1d@10"],
                      "prop_attn": True, "impl": "function", "protected": None}
    assert recipe.compress.stages[0].method == "tome" and recipe.compress.stages[0].params == {"r": 8}
    # The text form parses back to the same stage (what compress_file gets is what the mapping said).
    from tcexport.compress import plan as compress_plan

    assert [compress_plan.parse_stage(t) for t in stages["stages"]] == [
        (s.method, s.params, fields.layers_text(s.layers)) for s in recipe.compress.stages]
    # Written back (recipe.yaml): stages alone, no single-method fields; it loads again unchanged.
    dumped = yaml.safe_load(recipe.to_yaml())["compress"]
    assert set(dumped) == {"stages", "prop_attn", "impl", "protected"}
    assert loading.parse(yaml.safe_load(recipe.to_yaml())).model_dump() == recipe.model_dump()
    single = loading.parse(yaml.safe_load(GOOD + "compress: {r: 8}"))
    assert set(yaml.safe_load(single.to_yaml())["compress"]) == {"method", "r", "layers", "schedule", "prop_attn",
                                                                "impl", "protected"}


def test_missing_recipe_file_and_cli_options_beside_a_recipe(tmp_path):
    from tcexport import pipeline

    with pytest.raises(UsageError, match="no such recipe file"):
        loading.load(tmp_path / "nope.yaml")
    path = tmp_path / "ok.yaml"
    path.write_text(GOOD)
    with pytest.raises(UsageError, match="--opt-level, --seq-len cannot be combined with a recipe"):
        pipeline.build(str(path), tmp_path / "out", opt_level="basic", seq_len=8)
    assert not (tmp_path / "out").exists()


def test_defaults_skips_and_relative_checkpoint(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pth").write_bytes(b"")
    path = tmp_path / "my recipe.yaml"
    path.write_text("model: {spec: 'timm:x', checkpoint: weights/w.pth}\nvalidate: false\nbench: false\n"
                    "export: {atol: 1e-4}\n")  # PyYAML reads 1e-4 as a string; the schema takes it as a number
    recipe = loading.load(path)
    assert recipe.name == "my_recipe"
    assert recipe.model.checkpoint == str((tmp_path / "weights" / "w.pth").resolve())
    assert recipe.validation is None and recipe.bench is None and recipe.compress is None
    assert recipe.export.atol == 1e-4
    dumped = yaml.safe_load(recipe.to_yaml())
    assert dumped["validate"] is False and dumped["bench"] is False and "compress" not in dumped

    path.write_text("model: {spec: 'hf:./bert'}\n")
    assert loading.load(path).model.spec == f"hf:{(tmp_path / 'bert').resolve()}"
    path.write_text("model: {spec: 'st:all-MiniLM-L6-v2'}\n")
    assert loading.load(path).model.spec == "st:all-MiniLM-L6-v2"

    recipe = loading.parse({"model": {"spec": "timm:x"}, "export": {"batch": 2}})
    assert recipe.validation.batch == [2] and recipe.bench.batch == [2]
    recipe = loading.parse({"model": {"spec": "timm:x"}})
    assert recipe.validation.batch == [1, 3] and recipe.bench.batch == [1, 8]


def test_output_dir_that_is_not_a_recipe_output_is_refused(tmp_path):
    recipe = loading.parse({"model": {"spec": "timm:x"}})
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not the output of a recipe"):
        runner.run(recipe, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- end to end


LAYOUT = {"model.onnx", "model.tc.onnx", "validate.json", "baseline", "compressed", "bench.json", "bench.png",
          "recipe.yaml", "summary.json"}


@pytest.fixture(scope="module")
def vit_tiny_run(tmp_path_factory):
    """The shipped vit_tiny recipe, run once through the CLI with a short bench."""
    work = tmp_path_factory.mktemp("vit_tiny_recipe")
    data = yaml.safe_load((ROOT / "recipes" / "vit_tiny_tome_r8.yaml").read_text())
    data["bench"].update(iters=3, warmup=1)
    data["validate"].update(samples=2)  # one sample at batch 1, one at batch 3
    recipe = work / "vit_tiny_short.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = work / "out"
    result = run_cli("build", recipe, "-o", out)
    return result, out, work


def test_vit_tiny_recipe_end_to_end(vit_tiny_run):
    result, out, work = vit_tiny_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p.name for p in out.iterdir()} == LAYOUT
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []  # the temporary directory is gone
    for build in ("baseline", "compressed"):
        sidecar = json.loads((out / build / "tcexport-build.json").read_text())
        assert sidecar["backend"] == "ort"
        assert Path(sidecar["source_model"]) == out.resolve() / ("model.onnx" if build == "baseline" else "model.tc.onnx")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["name"] == "vit_tiny_tome_r8"
    assert summary["tokens"]["in"] == 197 and summary["tokens"]["out"] == 197 - 12 * 8
    assert summary["validation"]["passed"] is True and summary["validation"]["samples"] == 2
    assert [s["batch"] for s in summary["speedup"]] == [1, 8]
    assert all(s["speedup"] > 0 for s in summary["speedup"])

    bench = json.loads((out / "bench.json").read_text())
    assert [a["label"] for a in bench["artifacts"]] == ["baseline", "compressed"]
    assert bench["settings"]["iters"] == 3
    assert json.loads((out / "validate.json").read_text())["passed"] is True
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"

    # recipe.yaml is the resolved recipe: it loads again and says what ran.
    resolved = loading.load(out / "recipe.yaml")
    assert resolved.bench.iters == 3 and resolved.compress.r == 8 and resolved.validation.batch == [1, 3]

    # Progress: one line per stage on stderr (not a terminal), each with its elapsed time; stdout keeps the results.
    stages = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line[:len("[1/5] export")] for line in stages] == \
        ["[1/5] export", "[2/5] compre", "[3/5] valida", "[4/5] build ", "[5/5] bench "], result.stderr
    assert all(line.endswith(" s)") for line in stages)
    assert "[1/5]" not in result.stdout
    for text in ("latency in ms", "PASSED", "speedup at batch 8"):
        assert text in result.stdout, (text, result.stdout)
    # The closing summary names both builds.
    assert f"{out / 'compressed'} vs {out / 'baseline'}" in result.stdout


def test_rerun_into_its_own_output_is_fine_another_recipes_output_needs_force(vit_tiny_run, tmp_path):
    _, out, work = vit_tiny_run
    recipe = loading.load(work / "vit_tiny_short.yaml")
    assert runner.check_output(recipe, out) == f"replacing the earlier output of this recipe in {out}"
    other_path = tmp_path / "other.yaml"
    other_path.write_text(GOOD)
    other = loading.load(other_path)
    with pytest.raises(UsageError, match="holds the output of another recipe"):
        runner.check_output(other, out)
    assert "(--force)" in runner.check_output(other, out, force=True)
    summary = (out / "summary.json").read_text()
    result = run_cli("build", other_path, "-o", out)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--force" in lines[0], result.stderr
    assert (out / "summary.json").read_text() == summary  # untouched


def test_failed_validation_exits_1_and_leaves_no_dir(vit_tiny_run, tmp_path):
    _, out, _ = vit_tiny_run
    # Start from the export the end-to-end run made (an .onnx spec skips the export stage), relative to the recipe.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "vit_tiny.onnx").symlink_to(out / "model.onnx")
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"spec": "in/vit_tiny.onnx"},
        "compress": {"r": 8},
        "validate": {"samples": 1, "atol": 0.0, "rtol": 0.0},  # float32 rounding alone exceeds zero tolerance
        "bench": False,
    }))
    result = run_cli("build", recipe, "-o", tmp_path / "out")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[1/4] export" in result.stderr and "already exported" in result.stderr
    assert "validation failed" in result.stderr and "EXCEEDS TOLERANCE" in result.stderr
    assert "nothing written" in result.stderr and ".tmp" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "strict.yaml"]


# ---------------------------------------------------------------------------------------------- several methods


@pytest.fixture(scope="module")
def multistage_run(tmp_path_factory):
    """The shipped MustDrop-style recipe (ToMe at 0-5, top-k at 6 and 9), run in process with a short bench."""
    work = tmp_path_factory.mktemp("multistage_recipe")
    data = yaml.safe_load((ROOT / "recipes" / "vit_tiny_multistage.yaml").read_text())
    data["bench"].update(iters=2, warmup=1)
    data["validate"].update(samples=2)
    path = work / "vit_tiny_multistage.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    lines: list[str] = []
    progress_log = io.StringIO()
    with contextlib.redirect_stderr(progress_log):
        progress.configure("lines")
        try:
            summary = runner.run(loading.load(path), work / "out", echo=lines.append)
        finally:
            progress.configure("off")
    return summary, work / "out", progress_log.getvalue()


def test_multistage_recipe_end_to_end(multistage_run):
    from tcexport.methods.topk import TopK

    summary, out, log = multistage_run
    assert {p.name for p in out.iterdir()} == LAYOUT
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["validation"]["passed"] is True and summary["validation"]["samples"] == 2
    tokens = summary["tokens"]
    after_tome = 197 - 6 * 8
    after_6 = TopK(keep=0.7).tokens_out(after_tome, 1)
    after_9 = TopK(keep=0.7).tokens_out(after_6, 1)
    assert tokens["in"] == 197 and tokens["out"] == after_9
    assert [b["method"] for b in tokens["per_block"]] == ["tome"] * 6 + ["topk", None, None, "topk", None, None]
    assert [b["out"] for b in tokens["per_block"]] == [197 - 8 * (i + 1) for i in range(6)] + \
        [after_6] * 3 + [after_9] * 3
    assert tokens["by_method"] == {"tome": {"blocks": [0, 1, 2, 3, 4, 5], "removed": 48},
                                   "topk": {"blocks": [6, 9], "removed": after_tome - after_9}}
    assert summary["compression"]["plan"] == "tome:r=8@0-5 + topk:keep=0.7@6,9"
    assert [s["batch"] for s in summary["speedup"]] == [1, 8]
    assert json.loads((out / "bench.json").read_text())["settings"]["iters"] == 2
    assert "[2/5] compress  tome:r=8@0-5 + topk:keep=0.7@6,9" in log
    resolved = loading.load(out / "recipe.yaml")
    assert resolved.compress.plan()["stages"] == ["tome:r=8@0-5", "topk:keep=0.7@6,9"]


def test_query_recipe_adds_an_input_and_still_validates_and_benches(multistage_run, tmp_path):
    """query adds the graph input 'query': validate feeds it, bench feeds every graph input."""
    _, out, _ = multistage_run
    (tmp_path / "vit.onnx").symlink_to(out / "model.onnx")
    path = tmp_path / "query.yaml"
    path.write_text("model: {spec: vit.onnx}\ncompress: {method: query, params: {keep: 0.5}, layers: '4,8'}\n"
                    "validate: {samples: 1, batch: 1}\nbench: {batch: 1, iters: 1, warmup: 0}\n")
    summary = runner.run(loading.load(path), tmp_path / "out", echo=lambda text: None)
    assert summary["compression"]["extra_inputs"] == ["query"]
    assert summary["tokens"]["by_method"] == {"query": {"blocks": [4, 8], "removed": 197 - 50}}
    assert summary["validation"]["passed"] is True
    assert [s["batch"] for s in summary["speedup"]] == [1]
