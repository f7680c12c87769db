"""Decoder export (issue 19): every tiny causal-LM class of the decoder zoo exports to one graph with a KV cache
whose ORT generation loop gives transformers' greedy tokens (a left-padded batch of two prompts, one longer than
the sliding window), with the I/O names and dynamic dims ONNX Runtime GenAI and Optimum use; onnxruntime-genai
runs the exported graph from the genai_config.json written beside it; bad input is one line, exit 2.

Each class exports once per run (made_once). Llama and GPT-2 take the default run; the other classes and
SmolLM2 (real weights, 30 layers) are `slow`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tcexport.models import decoder_zoo
from tests.conftest import assert_usage_error, cli_here, exported, made_once, run_cli

FAST_KINDS = ("llama", "gpt2")
KIND_PARAMS = [pytest.param(kind, marks=[] if kind in FAST_KINDS else [pytest.mark.slow])
               for kind in decoder_zoo.KINDS]
# The first prompt (about 30 tokens) reaches past the zoo's window of 8; the second is left-padded by ~25.
PROMPTS = ("The capital of France is a city that has many old buildings, and a river runs through the old town "
           "between its walls and bridges.", "Hello there, friend")
NEW_TOKENS = 10
SMOLLM2_PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer, read from its GGUF once; the decoder directories are saved beside it."""
    return made_once(tmp_path_factory, "decoder_zoo", decoder_zoo.tokenizer_dir)


def decoder_dir(tmp_path_factory, zoo_root: Path, kind: str) -> Path:
    made_once(tmp_path_factory, f"decoder_zoo_{kind}", lambda _: decoder_zoo.decoder_dir(kind, zoo_root))
    return decoder_zoo.decoder_dir(kind, zoo_root)


@pytest.fixture(scope="session", params=KIND_PARAMS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, zoo_root, kind) -> Path:
    return decoder_dir(tmp_path_factory, zoo_root, kind)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_dir, kind) -> Path:
    return exported(tmp_path_factory, f"decoder_onnx_{kind}", f"hf:{tiny_dir}", f"{kind}.onnx")


def _hf(directory: Path, **overrides):
    import transformers

    from tcexport.models.sources import _quiet_transformers

    _quiet_transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager",
                                                             **overrides).eval()


def _tokenizer(directory: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory))


def _hf_greedy(model, tokenizer, prompts, new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate on a left-padded batch: the new tokens of each row."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def _loop(model_path: Path, prompt_ids, new_tokens: int, pad_id: int = decoder_zoo.PAD):
    from tcexport.generation import loop, runners

    return loop.generate(runners.OrtRunner(model_path), [list(p) for p in prompt_ids], new_tokens, (), pad_id=pad_id)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ---------------------------------------------------------------------------------------------- the zoo


def test_zoo_models_are_tiny_grouped_windowed_and_not_degenerate(tiny_dir, kind):
    model, tokenizer = _hf(tiny_dir), _tokenizer(tiny_dir)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    assert 32 <= config.hidden_size <= 64 and 2 <= config.num_hidden_layers <= 3, config
    assert config.vocab_size == len(tokenizer) == decoder_zoo.VOCAB
    assert (kv_heads < heads) == (kind != "gpt2"), (kind, heads, kv_heads)  # GQA where the class has it
    window = getattr(config, "sliding_window", None)
    assert (window is not None) == (kind in decoder_zoo.WINDOWED_KINDS)
    assert window is None or window <= 16
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == bool(config.tie_word_embeddings) == (kind.removesuffix("_full") not in ("mistral", "phi3"))
    assert tokenizer(SMOLLM2_PROMPT)["input_ids"] == [504, 3575, 282, 4649, 314]  # SmolLM2's own ids
    for prompt in PROMPTS:
        tokens = _hf_greedy(model, tokenizer, [prompt], 12)[0]
        longest_run = max(sum(1 for _ in group) for _, group in itertools.groupby(tokens))
        assert len(set(tokens)) >= 6 and longest_run <= 4, (kind, tokens)


def test_zoo_directories_are_saved_once_and_seeded(tmp_path, zoo_root, llama_dir):
    first = llama_dir  # made under the run's lock (made_once), so no other worker is writing it
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert decoder_zoo.decoder_dir("llama", zoo_root) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    a, b = decoder_zoo.random_decoder("qwen2", seed=0), decoder_zoo.random_decoder("qwen2", seed=0)
    c = decoder_zoo.random_decoder("qwen2", seed=1)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert (a.state_dict()[weight] == b.state_dict()[weight]).all()
    assert not (a.state_dict()[weight] == c.state_dict()[weight]).all()
    with pytest.raises(KeyError, match="unknown decoder kind 'bert'"):
        decoder_zoo.decoder_dir("bert", tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- export


def test_greedy_tokens_match_transformers_on_a_left_padded_batch(tiny_onnx, tiny_dir, kind):
    model, tokenizer = _hf(tiny_dir), _tokenizer(tiny_dir)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert len(prompt_ids[0]) > 20 and len(prompt_ids[0]) - len(prompt_ids[1]) > 15
    result = _loop(tiny_onnx, prompt_ids, NEW_TOKENS)
    assert result.tokens == _hf_greedy(model, tokenizer, PROMPTS, NEW_TOKENS)
    # every layer's cache: the whole sequence (prompt slots + the new tokens fed back), or the window's last slots
    slots = len(prompt_ids[0]) + NEW_TOKENS - 1
    from transformers import DynamicCache

    sliding = DynamicCache(config=model.config).is_sliding
    expected = {f"past_key_values.{i}.{part}": (model.config.sliding_window - 1 if sliding[i] else slots)
                for i in range(model.config.num_hidden_layers) for part in ("key", "value")}
    assert result.cache_lengths == expected


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) for k in decoder_zoo.WINDOWED_KINDS],
                         indirect=True)
def test_the_window_takes_part_in_the_match(tiny_onnx, tiny_dir, kind):
    """The same weights with every layer global give other logits on the long prompt: the token match above
    exercises the graph's window, not only attention the window leaves whole."""
    model = _hf(tiny_dir)
    layers = model.config.num_hidden_layers
    overrides = {"sliding_window": None} if kind in ("mistral", "phi3") else {
        "layer_types": ["full_attention"] * layers}
    global_model = _hf(tiny_dir, **overrides)
    prompt = _tokenizer(tiny_dir)(PROMPTS[0])["input_ids"]
    graph = _loop(tiny_onnx, [prompt], 1).first_logits[0]
    import torch

    with torch.no_grad():
        windowed = model(torch.tensor([prompt])).logits[0, -1].numpy()
        unwindowed = global_model(torch.tensor([prompt])).logits[0, -1].numpy()
    assert np.abs(graph - windowed).max() < 1e-3
    assert np.abs(graph - unwindowed).max() > 1e-2


def test_graph_io_names_and_dynamic_dims(tiny_onnx, tiny_dir, kind):
    from tcexport.models.causal import input_names, output_names

    config = _hf(tiny_dir).config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    graph = onnx.load(str(tiny_onnx), load_external_data=False).graph
    inputs, outputs = {i.name: i for i in graph.input}, {o.name: o for o in graph.output}
    assert list(inputs) == input_names(layers) and list(outputs) == output_names(layers)
    assert inputs["past_key_values.0.key"].name == "past_key_values.0.key" and "present.1.value" in outputs
    assert _dims(inputs["input_ids"]) == ["batch", "seq"] == _dims(inputs["position_ids"])
    assert _dims(inputs["attention_mask"]) == ["batch", "total"]
    assert _dims(outputs["logits"]) == ["batch", 1, decoder_zoo.VOCAB]  # the prefill's last position only
    pasts = [_dims(inputs[f"past_key_values.{i}.{part}"]) for i in range(layers) for part in ("key", "value")]
    assert all(d[0] == "batch" and d[1] == kv_heads and isinstance(d[2], str) and d[3] == head_dim for d in pasts)
    # one past length for all layers, or one per layer where local and global layers mix (Gemma-2/3)
    names = {d[2] for d in pasts}
    assert names == ({f"past_{i}" for i in range(layers)} if kind in ("gemma2", "gemma3_text") else {"past"})
    for name in input_names(layers):
        assert inputs[name].type.tensor_type.elem_type == (onnx.TensorProto.FLOAT if name.startswith("past")
                                                           else onnx.TensorProto.INT64)

    # batch, sequence and past stay dynamic: the graph runs at other sizes than its example (2, 5, 3)
    from tcexport.backends import ort as ort_backend
    from tcexport.export import decoder as decoder_export
    from tcexport.models.causal import DecoderShape

    shape = DecoderShape(kind, layers, kv_heads, head_dim, decoder_zoo.VOCAB, 256, (2,), 1, 2)
    session = ort_backend.open_session(tiny_onnx)
    for batch, seq, past in ((1, 1, 0), (3, 9, 0), (4, 1, 6), (1, 3, 4)):
        feeds = decoder_export.feeds_of(decoder_export.example_inputs(shape, batch, seq, past), layers)
        out = ort_backend.run(session, feeds)
        assert out["logits"].shape == (batch, 1, decoder_zoo.VOCAB)
        assert out["present.0.key"].shape[:2] == (batch, kv_heads)
        assert np.isfinite(out["logits"]).all()


# ---------------------------------------------------------------------------------------------- onnxruntime-genai


def _genai_greedy(directory: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt_ids])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]


def test_genai_config_is_written_where_every_layer_keeps_the_whole_cache(tiny_onnx, kind):
    config_file = tiny_onnx.parent / "genai_config.json"
    if kind in decoder_zoo.WINDOWED_KINDS:
        assert not config_file.exists() and not (tiny_onnx.parent / "tokenizer.json").exists()
        return
    config = json.loads(config_file.read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == tiny_onnx.name
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert (decoder["num_hidden_layers"], decoder["head_size"]) == (2, 16)
    assert decoder["num_key_value_heads"] == (4 if kind == "gpt2" else 2)
    assert config["model"]["type"] == ("decoder" if kind == "gpt2" else kind.removesuffix("_full"))
    assert (config["model"]["eos_token_id"], config["model"]["pad_token_id"]) == (decoder_zoo.EOS, decoder_zoo.PAD)
    assert config["model"]["vocab_size"] == decoder_zoo.VOCAB and config["model"]["context_length"] == 256
    assert config["search"]["past_present_share_buffer"] is False
    assert (tiny_onnx.parent / "tokenizer.json").is_file() and (tiny_onnx.parent / "tokenizer_config.json").is_file()


def test_genai_runs_the_exported_graph_with_the_loops_and_transformers_tokens(tiny_onnx, tiny_dir, kind):
    if kind in decoder_zoo.WINDOWED_KINDS:
        pytest.skip("no genai_config.json for sliding-window layers")
    og = pytest.importorskip("onnxruntime_genai")
    model, tokenizer = _hf(tiny_dir), _tokenizer(tiny_dir)
    genai_tokenizer = og.Tokenizer(og.Model(str(tiny_onnx.parent)))
    for prompt in PROMPTS:  # one prompt per call: genai 0.18's append_tokens does not mask a padded batch
        ids = tokenizer(prompt)["input_ids"]
        assert [int(t) for t in genai_tokenizer.encode(prompt)] == ids
        expected = _hf_greedy(model, tokenizer, [prompt], NEW_TOKENS)[0]
        assert _loop(tiny_onnx, [ids], NEW_TOKENS).tokens[0] == expected
        assert _genai_greedy(tiny_onnx.parent, ids, NEW_TOKENS) == expected


def test_generate_takes_a_text_prompt_with_the_zoo_tokenizer(tmp_path_factory, zoo_root, tmp_path):
    """The zoo's directories carry SmolLM2's tokenizer, so `tcexport generate --prompt TEXT` runs on their graphs
    and gives transformers' greedy tokens."""
    directory = decoder_dir(tmp_path_factory, zoo_root, "llama")
    model_path = exported(tmp_path_factory, "decoder_onnx_llama", f"hf:{directory}", "llama.onnx")
    result = run_cli("generate", model_path, "--prompt", SMOLLM2_PROMPT, "--max-new-tokens", "8",
                     "--json", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["prompt_ids"] == [[504, 3575, 282, 4649, 314]]
    assert data["tokens"] == _hf_greedy(_hf(directory), _tokenizer(directory), [SMOLLM2_PROMPT], 8)


@pytest.mark.slow
def test_all_logits_gives_transformers_logits_at_every_position(tmp_path_factory, zoo_root, tmp_path):
    """--all-logits: the prefill returns logits [batch, seq, vocab] equal to transformers' own forward at every
    position (left padding in one row), the record says so, and generate (which reads the last row) still gives
    transformers' greedy tokens."""
    import onnxruntime as ort
    import torch

    directory = decoder_dir(tmp_path_factory, zoo_root, "llama")
    out = tmp_path / "all.onnx"
    result = cli_here("export", f"hf:{directory}", "--all-logits", "-o", out)
    assert result.returncode == 0, result.stderr
    from tcexport.core import metadata

    record = metadata.read(onnx.load(out, load_external_data=False), metadata.SOURCE)
    assert record["info"]["logits"] == "all" and record["options"]["all_logits"] is True
    model = _hf(directory)
    ids = torch.randint(3, decoder_zoo.VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    logits = session.run(["logits"], feeds)[0]
    assert logits.shape == expected.shape == (2, 9, decoder_zoo.VOCAB)
    real = mask.numpy().astype(bool)  # padded positions' logits are not defined by either side
    assert np.abs(logits[real] - expected[real]).max() < 1e-3
    prompt = ids[0].tolist()
    assert _loop(out, [prompt], 6).tokens == _hf_greedy(model, _FixedTokenizer(), [prompt], 6)


class _FixedTokenizer:
    """Token ids in, as a tokenizer's batch out (for _hf_greedy on prompts given as ids)."""

    pad_token_id = decoder_zoo.PAD
    padding_side = "left"

    def __call__(self, prompts, return_tensors, padding):
        import torch

        return {"input_ids": torch.tensor(prompts), "attention_mask": torch.ones(len(prompts), len(prompts[0]),
                                                                                  dtype=torch.int64)}


def test_all_logits_is_refused_for_an_encoder_in_one_line(tmp_path):
    result = cli_here("export", "st:all-MiniLM-L6-v2", "--all-logits", "-o", tmp_path / "x.onnx")
    assert_usage_error(result)
    assert "--all-logits applies to causal LMs" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, zoo_root) -> Path:
    return decoder_dir(tmp_path_factory, zoo_root, "llama")


def test_cli_refuses_a_sequence_length_for_a_decoder(llama_dir, tmp_path):
    out = tmp_path / "x.onnx"
    result = cli_here("export", f"hf:{llama_dir}", "--seq-len", "5", "-o", out)
    assert_usage_error(result)
    assert "causal LM" in result.stderr and "--seq-len" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("extra, words", [(["--batch", "2"], "--batch"), (["--exporter", "torchscript"], "torchscript")])
def test_cli_refuses_a_fixed_batch_and_torchscript_for_a_decoder(llama_dir, tmp_path, extra, words):
    out = tmp_path / "x.onnx"
    result = run_cli("export", f"hf:{llama_dir}", *extra, "-o", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "causal LM" in last and words in last, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [["--batch", "2"], ["--exporter", "torchscript"]])
def test_cli_refuses_a_fixed_batch_for_a_decoder_in_one_line(llama_dir, tmp_path, extra):
    """Refused before the model loads (pipeline.export checks causal.locate first): no load progress line."""
    result = cli_here("export", f"hf:{llama_dir}", *extra, "-o", tmp_path / "x.onnx")
    assert_usage_error(result)
    assert "causal LM" in result.stderr and extra[0] in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_unreadable_gguf_in_one_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    out = tmp_path / "x.onnx"
    result = cli_here("export", f"hf:{model}", "-o", out)
    assert_usage_error(result)
    assert "weights.gguf" in result.stderr and "cannot load" in result.stderr, result.stderr
    assert not out.exists() and not (tmp_path / "genai_config.json").exists()


@pytest.fixture(scope="session")
def bert_causal_head(tmp_path_factory) -> Path:
    """A tiny BERT saved with its causal-LM class (BertLMHeadModel, is_decoder): a causal architecture name of an
    encoder family."""

    def make(directory: Path) -> None:
        import torch
        from transformers import BertConfig, BertLMHeadModel

        config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, is_decoder=True,
                            architectures=["BertLMHeadModel"])
        torch.manual_seed(0)
        BertLMHeadModel(config).save_pretrained(directory / "bert")

    return made_once(tmp_path_factory, "bert_causal_head", make) / "bert"


def test_a_causal_head_of_an_encoder_family_loads_as_an_encoder(bert_causal_head):
    from tcexport.models import causal, sources

    assert causal.locate(str(bert_causal_head)) is None
    source = sources.load(f"hf:{bert_causal_head}", seq_len=16)
    assert source.info.get("kind") != "decoder" and source.outputs == ["last_hidden_state"]
    assert [spec.name for spec in source.inputs][0] == "input_ids" and "past" not in str(source.inputs)


@pytest.mark.slow
def test_a_causal_head_of_an_encoder_family_exports_as_an_encoder(bert_causal_head, tmp_path):
    result = run_cli("export", f"hf:{bert_causal_head}", "--seq-len", "16", "-o", tmp_path / "bert.onnx")
    assert result.returncode == 0, result.stderr
    graph = onnx.load(str(tmp_path / "bert.onnx"), load_external_data=False).graph
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx"]  # no genai_config.json, no tokenizer


def test_genai_writer_skips_windowed_configs_and_writes_atomically(tmp_path):
    from tcexport.export import genai_config
    from tcexport.models import causal

    mistral = decoder_zoo.decoder_config("mistral")
    llama = decoder_zoo.decoder_config("llama")
    assert genai_config.windowed_layers(mistral) == [0, 1]
    assert genai_config.windowed_layers(llama) == []
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(b"")
    shape = causal.DecoderShape("mistral", 2, 2, 16, decoder_zoo.VOCAB, 256, (2,), 1, 2)
    written, why = genai_config.write(model_path, mistral, shape, None)
    assert written == [] and "sliding-window" in why and "layers 0, 1" in why
    written, why = genai_config.write(model_path, llama, shape, None)
    assert why is None and written == [tmp_path / "genai_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai_config.json", "m.onnx"]  # no temporary left
    other = tmp_path / "other.onnx"
    written, why = genai_config.write(other, mistral, shape, None)  # another file's config stays
    assert written == [] and (tmp_path / "genai_config.json").is_file() and "removed" not in why
    written, why = genai_config.write(model_path, mistral, shape, None)  # m.onnx replaced by a windowed graph
    assert written == [] and not (tmp_path / "genai_config.json").exists() and "removed the earlier" in why
    two_eos = causal.DecoderShape("llama", 2, 2, 16, decoder_zoo.VOCAB, 256, (2, 7), None, None)
    config = genai_config.genai_config(llama, two_eos, "m.onnx")["model"]
    assert config["eos_token_id"] == [2, 7] and config["pad_token_id"] == 2 and config["bos_token_id"] == 2


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_export_gives_transformers_greedy_tokens_in_the_loop_and_in_genai(tmp_path_factory):
    import transformers

    from tcexport.models import causal

    location = causal.bundled_location("SmolLM2-135M-Instruct")
    model_path = exported(tmp_path_factory, "decoder_onnx_smollm2", "hf:SmolLM2-135M-Instruct", "smollm2.onnx")
    reference = causal.load(location, "hf:SmolLM2-135M-Instruct")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(location.directory), **location.load_kwargs())
    ids = tokenizer(SMOLLM2_PROMPT)["input_ids"]
    expected = _hf_greedy(reference, tokenizer, [SMOLLM2_PROMPT], NEW_TOKENS)[0]
    assert "Paris" in tokenizer.decode(expected)
    assert _loop(model_path, [ids], NEW_TOKENS).tokens[0] == expected
    config = json.loads((model_path.parent / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 30 and config["model"]["type"] == "llama"
    assert _genai_greedy(model_path.parent, ids, NEW_TOKENS) == expected
