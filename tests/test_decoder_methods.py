"""Decoder methods (issue 19): each selection exists twice (torch and ONNX, one spec) and they agree on random
inputs at several sizes and seeds; compressed tiny-Llama graphs validate against transformers' own forward under
the same stages; caches have the lengths each method promises; validate fails when the graph and its record
disagree; bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from tcexport import methods
from tcexport.graph.decoder_prune import _emit_select_with, _Graph
from tests.conftest import assert_usage_error, cli_here, made_once, run_cli

LAYERS = 3


def _run_emitted(build, feeds: dict[str, np.ndarray], out_type=onnx.TensorProto.INT64) -> np.ndarray:
    """A one-output ONNX model of the nodes `build(emit)` records, run on `feeds`."""
    model = helper.make_model(helper.make_graph([], "select", [], []), opset_imports=[helper.make_opsetid("", 18)])
    graph = _Graph(model)
    out = _emit_select_with(graph, build, "t")
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
              for name, value in feeds.items()]
    model.graph.node.extend(graph.new_nodes)
    model.graph.input.extend(inputs)
    model.graph.output.append(helper.make_tensor_value_info(out, out_type, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _holder(name):
    import onnx_ir as ir

    return ir.Value(name=name)


@pytest.mark.parametrize("params", [{"keep": 0.5}, {"keep": 0.3, "span": "2:-3"}, {"keep_count": 5, "span": ":"},
                                    {"keep": 0.25, "span": "10:"}, {"keep": 0.9, "span": "-6:-1"}])
@pytest.mark.parametrize("n,n_prompt", [(30, 30), (17, 17), (40, 52)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fastv_selection_torch_equals_onnx(params, n, n_prompt, seed):
    method = methods.get("fastv")(**params)
    scores = np.random.default_rng(seed).random((3, n)).astype(np.float32)
    for prefill in (True, False):
        expected = method.select(torch.from_numpy(scores), n_prompt, prefill).numpy()
        got = _run_emitted(lambda emit: method.build_select(emit, _holder("scores"), _holder("n_prompt"),
                                                            _holder("prefill")),
                           {"scores": scores, "n_prompt": np.array([n_prompt], np.int64),
                            "prefill": np.array([prefill])})
        np.testing.assert_array_equal(got, expected)
        if not prefill:  # a decode step keeps every token
            np.testing.assert_array_equal(got, np.tile(np.arange(n), (3, 1)))
    kept = method.select(torch.from_numpy(scores), n_prompt, True)
    assert kept.shape[1] < n or method.count(0, 0) == 0  # the prefill really prunes
    assert bool((kept[:, 1:] > kept[:, :-1]).all())  # original order


def test_fastv_keeps_the_best_span_tokens_and_everything_outside():
    method = methods.get("fastv")(keep=0.5, span="2:-2")
    scores = torch.tensor([[9.0, 9.0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 9.0, 9.0]])
    assert method.select(scores, 10, True).tolist() == [[0, 1, 3, 5, 7, 8, 9]]


@pytest.mark.parametrize("params", [{"budget": 6, "window": 4}, {"budget": 3, "window": 2, "kernel": 3},
                                    {"budget": 10, "window": 1, "kernel": 1}])
@pytest.mark.parametrize("keys", [20, 33])
@pytest.mark.parametrize("seed", [0, 1])
def test_snapkv_selection_torch_equals_onnx(params, keys, seed):
    method = methods.get("snapkv")(**params)
    rng = np.random.default_rng(seed)
    heads, kv_heads = 6, 3
    logits = rng.standard_normal((2, heads, keys, keys)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    mask = np.ones((2, keys), np.int64)
    mask[1, :5] = 0  # left padding in row 1
    for prefill in (True, False):
        expected = method.select_cache(torch.from_numpy(probs), torch.from_numpy(mask), kv_heads)
        if not prefill:
            expected = torch.arange(keys).expand(2, kv_heads, keys)
        got = _run_emitted(lambda emit: method.build_select_cache(emit, _holder("probs"), _holder("mask"), kv_heads,
                                                                  heads, _holder("prefill")),
                           {"probs": probs, "mask": mask, "prefill": np.array([prefill])})
        np.testing.assert_array_equal(got, expected.numpy())
    kept = method.select_cache(torch.from_numpy(probs), torch.from_numpy(mask), kv_heads)
    assert kept.shape == (2, kv_heads, params["budget"] + params["window"])
    assert bool((kept[1] >= 5).all())  # never a padded position
    assert set(range(keys - params["window"], keys)) <= set(kept[0, 0].tolist())  # the window itself


# ---------------------------------------------------------------------------------------------- tiny Llama end to end


@pytest.fixture(scope="session")
def llama_onnx(tmp_path_factory) -> Path:
    def make(directory: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        from tcexport.export import exporter
        from tcexport.models import sources

        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             architectures=["LlamaForCausalLM"], eos_token_id=None, bos_token_id=None)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory / "llama")
        exporter.export_to_file(sources.load(f"hf:{directory / 'llama'}"), directory / "llama.onnx")

    return made_once(tmp_path_factory, "decoder_methods_llama", make) / "llama.onnx"


def _compress(source: Path, out: Path, *args: str) -> Path:
    """compress in-process (the CLI's own parsing: the same command, without a fresh interpreter per call)."""
    from click.testing import CliRunner

    from tcexport.cli import cli

    result = CliRunner().invoke(cli, ["compress", str(source), "-o", str(out), *map(str, args)],
                                standalone_mode=False, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


CASES = {
    "fastv": ("--method", "fastv", "--keep", "0.5", "--layers", "0"),
    "pdrop": ("--stage", "pdrop:keep=0.5,0.25@0,1"),
    "snapkv": ("--method", "snapkv", "--budget", "6", "--window", "4"),
    "streaming": ("--method", "streaming", "--sink", "2", "--window", "6"),
}


@pytest.mark.parametrize("case", [c if c == "fastv" else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)])
def test_compressed_decoder_validates_against_transformers(llama_onnx, tmp_path, case):
    out = _compress(llama_onnx, tmp_path / f"{case}.onnx", *CASES[case])
    result = cli_here("validate", out, "--samples", "3", "--json", tmp_path / "report.json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == "decoder" and report["passed"]
    assert len(report["samples"]) == 3
    for sample in report["samples"]:
        assert sample["prefill_logits_max_abs"] < 1e-5
        assert all(row["tokens_equal"] for row in sample["rows"])


def _generate(model: Path, tmp_path: Path, prompt_len: int, new_tokens: int) -> dict:
    from tcexport.generation import run

    ids = ",".join(str(i % 100 + 1) for i in range(prompt_len))
    return run.run(model, ids_texts=(ids,), max_new_tokens=new_tokens, stream=False)


def test_cache_lengths_are_what_each_method_promises(llama_onnx, tmp_path):
    n, new = 30, 12
    base = _generate(llama_onnx, tmp_path, n, new)["cache_lengths"]
    assert set(base.values()) == {n + new - 1}
    fastv = _compress(llama_onnx, tmp_path / "fastv.onnx", *CASES["fastv"])
    lengths = _generate(fastv, tmp_path, n, new)["cache_lengths"]
    span = n - 4 - 8
    kept = n - span + int(np.floor(0.5 * span + 0.5))
    assert lengths["past_key_values.0.key"] == n + new - 1  # the named layer's own cache stays whole
    assert lengths["past_key_values.1.key"] == lengths["past_key_values.2.key"] == kept + new - 1
    assert lengths["past_positions.1"] == kept + new - 1
    snap = _compress(llama_onnx, tmp_path / "snap.onnx", *CASES["snapkv"])
    assert set(_generate(snap, tmp_path, n, new)["cache_lengths"].values()) == {6 + 4 + new - 1}
    stream = _compress(llama_onnx, tmp_path / "stream.onnx", *CASES["streaming"])
    long = _generate(stream, tmp_path, n, 40)
    assert set(long["cache_lengths"].values()) == {2 + 6}  # bounded (sink + window), whatever the number of tokens
    assert long["kv_bytes"] < _generate(llama_onnx, tmp_path, n, 40)["kv_bytes"]


def test_validate_fails_when_the_graph_is_not_what_its_record_says(llama_onnx, tmp_path):
    """The check can fail: a graph pruned with keep 0.5, validated against a reference told keep 0.25."""
    from tcexport.core import metadata

    out = _compress(llama_onnx, tmp_path / "fastv.onnx", *CASES["fastv"])
    model = onnx.load(out)
    record = metadata.read(model, metadata.COMPRESSION)
    record["stages"][0]["params"]["keep"] = 0.25
    metadata.write(model, metadata.COMPRESSION, record)
    onnx.save(model, tmp_path / "tampered.onnx")
    result = cli_here("validate", tmp_path / "tampered.onnx", "--samples", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stderr


@pytest.mark.parametrize("args,needle", [
    (("--method", "fastv", "--keep", "1", "--layers", "0"), "keep=1"),
    (("--method", "fastv", "--keep", "0.5", "--layers", str(LAYERS - 1)), "no later layer"),
    (("--method", "fastv", "--keep", "0.5", "--layers", "0", "--span", "abc"), "span"),
    (("--method", "tome", "--r", "2"), "bidirectional encoders"),
    (("--method", "snapkv", "--budget", "4", "--kernel", "4"), "odd"),
    (("--stage", "fastv:keep=0.5@0", "--stage", "streaming:sink=2,window=4@1"), "does not combine"),
])
def test_bad_decoder_compress_is_one_line(llama_onnx, tmp_path, args, needle):
    result = cli_here("compress", llama_onnx, "-o", tmp_path / "x.onnx", *args)
    assert_usage_error(result)
    assert needle in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_bad_generate_is_one_line(llama_onnx, tmp_path):
    snap = _compress(llama_onnx, tmp_path / "snap.onnx", *CASES["snapkv"])
    short = run_cli("generate", snap, "--prompt-ids", "1,2,3,4,5", "--json", tmp_path / "g.json")  # a real process
    assert_usage_error(short)
    assert "not smaller" in short.stderr and not (tmp_path / "g.json").exists()
    assert_usage_error(cli_here("generate", llama_onnx, "--prompt-ids", "1,2,999"))  # outside the vocabulary
    assert_usage_error(cli_here("generate", llama_onnx, "--prompt-ids", "1", "--max-new-tokens", "300"))  # context
    assert_usage_error(cli_here("generate", llama_onnx, "--prompt", "hi"))  # no tokenizer in this directory


def test_decoder_methods_refuse_encoder_graphs(bert_onnx, tmp_path):
    result = cli_here("compress", bert_onnx, "--method", "fastv", "--keep", "0.5", "-o", tmp_path / "x.onnx")
    assert_usage_error(result)
    assert "causal LM" in result.stderr


def test_decoder_trt_profile_spans_prefill_and_decode(llama_onnx, tmp_path):
    from tcexport.backends import trt_profiles
    from tcexport.models import inputs

    fastv = _compress(llama_onnx, tmp_path / "fastv.onnx", *CASES["fastv"])
    specs = inputs.specs_from_graph(onnx.load(fastv, load_external_data=False))
    shapes = trt_profiles.profile_shapes(specs, (1, 2, 4))
    seq, past = trt_profiles.DECODER_SEQ, trt_profiles.DECODER_PAST
    assert shapes["input_ids"].min == (1, seq[0]) and shapes["input_ids"].max == (4, seq[2])
    assert shapes["past_key_values.2.key"].min[2] == 0 and shapes["past_key_values.2.key"].max[2] == past[2]
    assert shapes["past_positions.1"].max == (4, past[2])
    assert shapes["attention_mask"].opt == (2, seq[1] + past[1])


@pytest.mark.slow
def test_ort_build_of_a_compressed_decoder_generates_and_validates(llama_onnx, tmp_path):
    fastv = _compress(llama_onnx, tmp_path / "fastv.onnx", *CASES["fastv"])
    assert cli_here("build", fastv, "-o", tmp_path / "build").returncode == 0
    from_build = _generate(tmp_path / "build", tmp_path, 30, 6)
    assert from_build["tokens"] == _generate(fastv, tmp_path, 30, 6)["tokens"]
    result = cli_here("validate", tmp_path / "build", "--samples", "1")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_bench_times_decoders_side_by_side(llama_onnx, tmp_path, bert_onnx):
    fastv = _compress(llama_onnx, tmp_path / "fastv.onnx", *CASES["fastv"])
    result = run_cli("bench", llama_onnx, fastv, "--prompt-len", "24,40", "--new-tokens", "4", "--repeats", "2",
                     "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    entries = json.loads((tmp_path / "b.json").read_text())["entries"]
    # onnxruntime-genai (a dev dependency) runs the base graph from the genai_config.json export wrote beside it
    labels = ("llama", "fastv", "onnxruntime-genai")
    assert {(e["label"], e["prompt_len"]) for e in entries} == {(m, n) for m in labels for n in (24, 40)}
    for e in entries:
        assert e["ttft_ms"] > 0 and e["decode_tokens_per_s"] > 0 and e["rounds"] == 2
        if e["label"] != "onnxruntime-genai":
            assert (e["kv_ratio"] < 1) == (e["label"] == "fastv")  # FastV's later layers cache fewer positions
    assert_usage_error(run_cli("bench", llama_onnx, bert_onnx))


def test_fidelity_points_leave_room_for_prompt_and_continuation():
    from tcexport.core.errors import UsageError
    from tcexport.validate.decoder_fidelity import points

    chosen = points(700, 400, 16, 6)
    assert chosen[0] == 400 and chosen[-1] == 700 - 16 and len(chosen) == 6
    with pytest.raises(UsageError, match="too short"):
        points(300, 400, 16, 6)


@pytest.mark.slow
def test_decoder_fidelity_on_text(tmp_path_factory, tmp_path):
    from tcexport.models import decoder_zoo
    from tests.conftest import exported

    root = made_once(tmp_path_factory, "decoder_zoo", decoder_zoo.tokenizer_dir)
    made_once(tmp_path_factory, "decoder_zoo_llama", lambda _: decoder_zoo.decoder_dir("llama", root))
    base = exported(tmp_path_factory, "decoder_onnx_llama", f"hf:{decoder_zoo.decoder_dir('llama', root)}",
                    "llama.onnx")
    same = run_cli("validate", base, "--reference-onnx", base, "--json", tmp_path / "same.json")
    assert same.returncode == 0, same.stderr
    report = json.loads((tmp_path / "same.json").read_text())
    assert report["next_token_agreement"] == 1.0 and report["greedy_agreement"] == 1.0
    assert abs(report["perplexity_change"]) < 1e-6
    fastv = _compress(base, tmp_path / "fastv.onnx", "--method", "fastv", "--keep", "0.25", "--layers", "0")
    pruned = run_cli("validate", fastv, "--reference-onnx", base, "--json", tmp_path / "fastv.json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads((tmp_path / "fastv.json").read_text())
    assert report["next_token_agreement"] < 1.0  # a quarter of a 400-token prompt changes the predictions
    assert len(report["points"]) == 6 and report["prompt_len"] >= 16
    strict = run_cli("validate", fastv, "--reference-onnx", base, "--min-agreement", "0.9999")
    assert strict.returncode == 1
