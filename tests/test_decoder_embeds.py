"""Decoder graphs that take inputs_embeds [batch, seq, hidden] instead of input_ids (the form a VLM's decoder takes,
fed by an embedding graph): export, every decoder method's rewrite and validate work on them; the generation loop
feeds them through an `embed` function; the commands that have no embedding to give refuse in one line.

The inputs_embeds export is reached through the Python API (sources.load(..., inputs_embeds=True)); the VLM model
directories of issue 20 will write it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import assert_usage_error, cli_here, exported
from tests.test_decoder_export import decoder_dir, zoo_root  # noqa: F401 (a fixture)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, zoo_root) -> Path:  # noqa: F811
    return decoder_dir(tmp_path_factory, zoo_root, "llama")


@pytest.fixture(scope="session")
def embeds_onnx(tmp_path_factory, llama_dir) -> Path:
    return exported(tmp_path_factory, "decoder_embeds_llama", f"hf:{llama_dir}", "llama-embeds.onnx",
                    inputs_embeds=True)


@pytest.fixture(scope="session")
def ids_onnx(tmp_path_factory, llama_dir) -> Path:
    return exported(tmp_path_factory, "decoder_onnx_llama", f"hf:{llama_dir}", "llama.onnx")


def _embed(llama_dir: Path):
    import transformers

    from tcexport.validate.decoder import table_embedding

    return table_embedding(transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir)))


PROMPTS = [[5, 9, 17, 33, 2, 8, 41, 7, 3, 12, 60, 4, 19, 22, 6, 30, 11, 9, 50, 13], [7, 7, 3, 90, 12, 5, 8, 44, 1, 2]]


def test_the_graph_takes_inputs_embeds_and_generates_the_input_ids_graphs_tokens(embeds_onnx, ids_onnx, llama_dir):
    from tcexport.core import metadata
    from tcexport.generation import loop, runners

    model = onnx.load(embeds_onnx, load_external_data=False)
    first = model.graph.input[0]
    assert first.name == "inputs_embeds"
    assert [d.dim_param or d.dim_value for d in first.type.tensor_type.shape.dim][2] == 64
    assert "input_ids" not in {i.name for i in model.graph.input}
    assert metadata.read(model, metadata.SOURCE)["info"]["token_input"] == "inputs_embeds"
    assert not (embeds_onnx.parent / "genai_config.json").exists()  # genai would feed it input_ids
    ours = loop.generate(runners.OrtRunner(embeds_onnx), PROMPTS, 8, embed=_embed(llama_dir))
    theirs = loop.generate(runners.OrtRunner(ids_onnx), PROMPTS, 8)
    assert ours.tokens == theirs.tokens
    assert np.abs(ours.first_logits - theirs.first_logits).max() < 1e-5
    with pytest.raises(Exception, match="takes inputs_embeds"):
        loop.generate(runners.OrtRunner(embeds_onnx), PROMPTS, 2)


@pytest.mark.parametrize("args", [("--method", "fastv", "--keep", "0.5", "--layers", "0"),
                                  pytest.param(("--method", "snapkv", "--budget", "6", "--window", "4"),
                                               marks=pytest.mark.slow)], ids=["fastv", "snapkv"])
def test_decoder_methods_compress_and_validate_on_an_inputs_embeds_graph(embeds_onnx, tmp_path, args):
    out = tmp_path / "c.onnx"
    compressed = cli_here("compress", embeds_onnx, "-o", out, *args)
    assert compressed.returncode == 0, compressed.stderr
    assert onnx.load(out, load_external_data=False).graph.input[0].name == "inputs_embeds"
    validated = cli_here("validate", out, "--json", tmp_path / "r.json")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    if args[1] == "fastv":  # the stage changed what the model computes
        import json

        report = json.loads((tmp_path / "r.json").read_text())
        lengths = report["samples"][-1]["cache_lengths"]
        assert lengths["past_key_values.1.key"] < lengths["past_key_values.0.key"], lengths


def test_generate_and_bench_refuse_an_inputs_embeds_graph_in_one_line(embeds_onnx, tmp_path):
    for args in (("generate", embeds_onnx, "--prompt-ids", "1,2,3", "--json", tmp_path / "g.json"),
                 ("bench", embeds_onnx, "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1")):
        result = cli_here(*args)
        assert_usage_error(result)
        assert "takes inputs_embeds" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_inputs_embeds_is_refused_for_an_encoder(tmp_path):
    from tcexport.core.errors import UsageError
    from tcexport.models import sources

    with pytest.raises(UsageError, match="inputs_embeds applies to causal LMs"):
        sources.load("st:all-MiniLM-L6-v2", inputs_embeds=True)
