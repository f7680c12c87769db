"""Tiny seeded causal LMs, one per decoder class tcexport exports, for tests (what `hf:DIR` loads as a decoder).

    decoder_dir(kind, root)   saves (once, atomically) a tiny random `*ForCausalLM` directory of `kind` under
                              `root`, with SmolLM2's tokenizer, so `--prompt TEXT` works on it

Every kind is 2-3 layers, 32-64 wide, with grouped-query attention where its class has it (fewer KV heads than
query heads; GPT-2 has none) and the class's own embedding tying. Classes with a sliding window get one of
SLIDING_WINDOW tokens, so a 20-40 token prompt reaches past it: Mistral and Phi-3 on every layer, Gemma-2
alternating local and global layers, Gemma-3 two local layers around a global one; `mistral_full` and
`phi3_full` are the same classes without one (as most released Mistral and Phi-3.5 checkpoints are).

The tokenizer is SmolLM2-135M-Instruct's (a 49152-token BPE read from its GGUF file once per root and copied
into each directory): the models' vocabulary is the tokenizer's, since a smaller embedding would make the
tokenizer's ids index past it. bos/eos/pad are the tokenizer's (1 <|im_start|>, 2 <|im_end|>, 2).

Weights are the class's own seeded init with a larger standard deviation (INIT_STD): at the default 0.02 a
32-wide model's logits are nearly flat and greedy decoding repeats one token; at INIT_STD the greedy tokens of a
prompt vary (tests/test_decoder_export.py checks it). `seeded_init.exercise` then redraws what it redraws, and
Gemma's branch norms are drawn large (_widen_branches says why).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tcexport.models.seeded_init import exercise
from tcexport.models.zoo import SEED, _save_once

VOCAB = 49152  # SmolLM2's tokenizer
BOS, EOS, PAD = 1, 2, 2
WIDTH = 32
SLIDING_WINDOW = 8
MAX_POSITIONS = 256
INIT_STD = 0.2
GPT2_INIT_STD = 0.3  # at 0.2 GPT-2's greedy tokens repeat one token for 5-11 steps
SANDWICH_KINDS = ("gemma2", "gemma3_text")  # a norm after each branch too (see _widen_branches)
BRANCH_NORM = (6.0, 8.0)

_IDS = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
# Llama-style attention: 4 query heads over 2 KV heads of width 16 (head_dim given: some classes default to 256).
_GQA = dict(hidden_size=WIDTH * 2, intermediate_size=WIDTH * 4, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_STD,
            **_IDS)

# kind -> (config class, model class, settings)
DECODERS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_GQA, tie_word_embeddings=True, rope_theta=1e5)),  # SmolLM2
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_GQA, tie_word_embeddings=True)),  # q/k/v biases
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(_GQA, tie_word_embeddings=False, sliding_window=SLIDING_WINDOW)),
    # fused qkv and gate_up projections, partial rotary
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(_GQA, tie_word_embeddings=False, sliding_window=SLIDING_WINDOW, partial_rotary_factor=0.5)),
    # local/global alternation, attention and final logit soft-capping, query_pre_attn_scalar, sandwich norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_GQA, tie_word_embeddings=True, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention"])),
    # q/k norms, a local RoPE base for sliding layers
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(_GQA, num_hidden_layers=3, tie_word_embeddings=True, sliding_window=SLIDING_WINDOW,
                         query_pre_attn_scalar=16,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # the same classes without a sliding window, as most released checkpoints of them are (Mistral-7B-v0.2 and
    # later set sliding_window null): every layer keeps the whole context, so the cache methods apply
    "mistral_full": ("MistralConfig", "MistralForCausalLM", dict(_GQA, tie_word_embeddings=False, sliding_window=None)),
    "phi3_full": ("Phi3Config", "Phi3ForCausalLM",
                  dict(_GQA, tie_word_embeddings=False, sliding_window=None, partial_rotary_factor=0.5)),
    # learned absolute positions, fused c_attn, no GQA
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=WIDTH * 2, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, initializer_range=GPT2_INIT_STD,
                  tie_word_embeddings=True, **_IDS)),
}
KINDS = tuple(DECODERS)
# Kinds whose layers do not all keep the whole context in their cache (a sliding window on some or all layers).
WINDOWED_KINDS = ("mistral", "phi3", "gemma2", "gemma3_text")


def decoder_config(kind: str):
    import transformers

    if kind not in DECODERS:
        raise KeyError(f"unknown decoder kind '{kind}'; choose one of {', '.join(KINDS)}")
    config_class, model_class, settings = DECODERS[kind]
    return getattr(transformers, config_class)(architectures=[model_class], **settings)


def random_decoder(kind: str, seed: int = SEED):
    """The tiny causal LM of `kind` with seeded weights (eager attention, eval mode)."""
    import torch
    import transformers

    config = decoder_config(kind)
    torch.manual_seed(seed)
    model_class = getattr(transformers, DECODERS[kind][1])
    model = model_class._from_config(config, attn_implementation="eager").eval()
    exercise(model, seed)
    if kind in SANDWICH_KINDS:
        _widen_branches(model, seed)
    return model


def _widen_branches(model, seed: int) -> None:
    """Gemma normalises each branch's output (post_attention/post_feedforward_layernorm, applied as 1 + weight)
    before adding it to a residual that starts as the embedding times sqrt(hidden): with the init's weight 0 the
    residual stays the current token's embedding, and the tied head greedily repeats the last token. Branch norms
    drawn from BRANCH_NORM (seeded) give the branches the embedding's scale."""
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    low, high = BRANCH_NORM
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                param.copy_(torch.rand(param.shape, generator=generator) * (high - low) + low)


def tokenizer_dir(root: Path) -> Path:
    """SmolLM2's tokenizer saved as transformers files under `root` (read from the bundled GGUF once: ~8 s)."""

    def write(tmp: Path) -> None:
        import transformers

        from tcexport.models.causal import BUNDLED, bundled_location

        location = bundled_location(next(iter(BUNDLED)))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(location.directory), **location.load_kwargs())
        tokenizer.save_pretrained(str(tmp))

    return _save_once(Path(root) / "smollm2-tokenizer", write)


def decoder_dir(kind: str, root: Path, seed: int = SEED) -> Path:
    """Save (once) the tiny causal LM of `kind` with SmolLM2's tokenizer under `root`; its path."""
    decoder_config(kind)  # an unknown kind fails before anything is written
    return save_with_tokenizer(Path(root) / f"decoder-{kind}-seed{seed}", lambda: random_decoder(kind, seed),
                               lambda: tokenizer_dir(root))


def save_with_tokenizer(directory: Path, make_model, make_tokenizer) -> Path:
    """Save (once, atomically) make_model()'s weights and config with the files of the tokenizer directory
    make_tokenizer() returns; the directory's path."""
    from tcexport.models.sources import _quiet_transformers

    _quiet_transformers()
    tokenizer = make_tokenizer()

    def write(tmp: Path) -> None:
        make_model().save_pretrained(str(tmp))
        for item in tokenizer.iterdir():
            shutil.copy(item, tmp / item.name)

    return _save_once(directory, write)
