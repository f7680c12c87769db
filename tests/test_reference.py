"""The eager PyTorch reference of a compressed model (tcexport.reference)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tcexport import data
from tcexport.models import sources
from tcexport.core.errors import UsageError
from tcexport.methods.tome import ToMe
from tcexport.reference import compressed_reference

TOL = 1e-5


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vit():
    return sources.load("timm:vit_tiny_patch16_224")


@pytest.fixture(scope="module")
def deit():
    return sources.load("timm:deit_tiny_distilled_patch16_224")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(7)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(directory)
    return sources.load(f"hf:{directory}", seq_len=16)


@pytest.fixture(scope="module")
def tiny_inputs():
    ids = torch.randint(0, 120, (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 16, dtype=torch.int64)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def minilm():
    return sources.load("st:all-MiniLM-L6-v2", seq_len=128)


@pytest.fixture(scope="module")
def sentences(minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm.info["tokenizer"])
    encoded = tokenizer(data.sentences(), padding="max_length", max_length=128, truncation=True,
                        return_tensors="pt")
    assert (encoded["attention_mask"].sum(1) < 64).all()  # short sentences: mostly padding
    return encoded["input_ids"], encoded["attention_mask"]


def run(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


def no_merge_plan(depth):
    """A method in every block that removes nothing: the explicit path (own attention, rebuilt masks,
    log(size) = 0) runs everywhere, so it must still reproduce the model."""
    return {i: ToMe(r=0) for i in range(depth)}


# ---------------------------------------------------------------------------------------------- (1) no-op plans


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_timm_no_op_plans_reproduce_the_model(name, request, images):
    source = request.getfixturevalue(name)
    expected = run(source.model, images)
    for plan in ({}, no_merge_plan(12)):
        reference = compressed_reference(source, plan)
        assert (run(reference, images) - expected).abs().max() < TOL
        tokens = source.model.patch_embed.num_patches + source.info["num_prefix_tokens"]
        assert reference.token_counts == [(tokens, tokens)] * 12


def test_hf_bert_no_op_plans_reproduce_the_model_with_padding(tiny_bert, tiny_inputs):
    expected = run(tiny_bert.model, *tiny_inputs)
    for plan in ({}, no_merge_plan(2)):
        reference = compressed_reference(tiny_bert, plan)
        assert (run(reference, *tiny_inputs) - expected).abs().max() < TOL
        assert reference.token_counts == [(16, 16), (16, 16)]


def test_t5_no_op_plans_reproduce_the_model_with_its_position_bias(tmp_path_factory, tiny_inputs):
    """T5's attention function gets the bucketed relative bias as a `position_bias` keyword (computed by layer 0,
    passed on to layer 1); the reference's attention adds it, so the encoder is reproduced (without it the
    outputs differ by far more than TOL: the bias is T5's own init, std d_model ** -0.5)."""
    from tcexport.models import zoo

    t5 = sources.load(f"hf:{zoo.hf_dir('t5', tmp_path_factory.mktemp('zoo_t5'))}", seq_len=16)
    ids = tiny_inputs[0] % zoo.SMALL_VOCAB
    expected = run(t5.model, ids, tiny_inputs[1])
    for plan in ({}, no_merge_plan(2)):
        reference = compressed_reference(t5, plan)
        assert (run(reference, ids, tiny_inputs[1]) - expected).abs().max() < TOL
    bias = t5.model.model.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.std() > 0.1


def test_a_reference_that_does_not_reproduce_the_model_is_refused():
    """Before any compression the reference must give the model's own output; a model that draws afresh on every
    call (as ViTMAE's patch shuffle did) cannot be reproduced, and is refused rather than checked against noise."""
    from tcexport.models.inputs import TOKEN_IDS, InputSpec
    from tests.fixtures.masked_encoders import TOKENS, Encoder

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder(["global", "global"])

        def forward(self, input_ids):
            return self.encoder(input_ids) + torch.rand(1)

    def source(model):
        ids = InputSpec("input_ids", ["batch", TOKENS], "int64", TOKEN_IDS, high=100)
        return sources.Source("py:toy", model.eval(), [ids], ["output"], {}, {"num_prefix_tokens": 1})

    noisy = Noisy()
    with pytest.raises(UsageError, match="does not reproduce the model before any compression"):
        compressed_reference(source(noisy), {0: ToMe(r=2)})
    assert compressed_reference(source(noisy.encoder), {0: ToMe(r=2)}).layout.blocks == 2


def test_attention_soft_capping_is_refused():
    from tcexport.reference.flow import TokenFlow
    from tcexport.reference.mode import Layout, TokenMode

    mode = TokenMode(TokenFlow({}, 1, True), Layout())
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(UsageError, match="passes 'softcap' to its attention function"):
        mode.hf_attention(torch.nn.Identity(), q, q, q, None, softcap=30.0)


def test_sentence_transformer_no_op_plans_reproduce_the_model(minilm, sentences):
    expected = run(minilm.model, *sentences)
    for plan in ({}, no_merge_plan(6)):
        reference = compressed_reference(minilm, plan)
        assert (run(reference, *sentences) - expected).abs().max() < TOL


# ---------------------------------------------------------------------------------------------- (2) token counts


def expected_counts(plan, n, depth, protected):
    counts = []
    for i in range(depth):
        n_out = plan[i].tokens_out(n, protected) if i in plan else n
        counts.append((n, n_out))
        n = n_out
    return counts


def test_token_counts_follow_tokens_out(vit, deit, images, tiny_bert, tiny_inputs):
    every = {i: ToMe(r=8) for i in range(12)}
    reference = compressed_reference(vit, every)
    logits = run(reference, images)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert reference.token_counts[:3] == [(197, 189), (189, 181), (181, 173)]
    assert reference.token_counts == expected_counts(every, 197, 12, 1)

    sparse = {0: ToMe(r=8), 3: ToMe(r=40), 11: ToMe(r=1000)}  # r=1000: capped at half the unprotected tokens
    reference = compressed_reference(deit, sparse)
    run(reference, images)
    assert reference.token_counts == expected_counts(sparse, 198, 12, 2)
    assert reference.token_counts[11] == (150, 76)

    plan = {0: ToMe(r=4), 1: ToMe(r=2)}
    reference = compressed_reference(tiny_bert, plan)
    hidden = run(reference, *tiny_inputs)
    assert reference.token_counts == [(16, 12), (12, 10)]
    assert hidden.shape == (3, 10, 32)  # hf: last_hidden_state simply has fewer tokens


# ---------------------------------------------------------------------------------------------- (3) by hand


def hand_block(block, x, size, method, bias):
    """One timm pre-LN block with compression written out from timm's modules (independent of the package)."""
    attn = block.attn
    batch, tokens, channels = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias:
        logits = logits + size.log()[:, None, None, :, 0]
    attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
    x = x + attn.proj(attended)
    if method is not None:
        x, size, _ = method.reference(x, k.mean(1), size, None, 1)
    return x + block.mlp(block.norm2(x)), size


def test_vit_block_zero_by_hand(vit, images):
    reference = compressed_reference(vit, {0: ToMe(r=8)})
    outputs = {}
    for i in (0, 1, 11):
        reference.model.blocks[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
    logits = run(reference, images)

    model = vit.model
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        size = torch.ones(2, 197, 1)
        x, size = hand_block(model.blocks[0], x, size, ToMe(r=8), bias=False)
        assert x.shape == (2, 189, 192) and size.sum(1).eq(197).all()
        assert (outputs[0] - x).abs().max() < TOL
        for i in range(1, 12):  # later blocks: proportional attention with the merged sizes
            x, size = hand_block(model.blocks[i], x, size, None, bias=True)
            if i in outputs:
                assert (outputs[i] - x).abs().max() < TOL
        expected = model.forward_head(model.norm(x))
    assert (logits - expected).abs().max() < TOL
    assert torch.equal(reference.state.size, size)


def test_prop_attn_switch(vit, images):
    plan = {0: ToMe(r=16)}
    with_bias = run(compressed_reference(vit, plan), images)
    reference = compressed_reference(vit, plan, prop_attn=False)
    first = {}
    reference.model.blocks[0].register_forward_hook(lambda m, a, out: first.setdefault(0, out))
    without = run(reference, images)
    assert (with_bias - without).abs().max() > 1e-4
    # Without prop-attn the blocks after the merge are timm's own: compare with running them directly.
    model = vit.model
    with torch.no_grad():
        expected = model.forward_head(model.norm(model.blocks[1:](first[0])))
    assert (without - expected).abs().max() < TOL


def test_avg_pool_is_size_weighted(vit, images):
    model = copy.deepcopy(vit.model)
    model.global_pool = "avg"
    source = dataclasses.replace(vit, model=model)
    expected = run(model, images)
    assert (run(compressed_reference(source, no_merge_plan(12)), images) - expected).abs().max() < TOL

    reference = compressed_reference(source, {i: ToMe(r=8) for i in range(12)})
    normed = []
    hook = reference.model.norm.register_forward_hook(lambda module, args, out: normed.append(out))
    logits = run(reference, images)
    hook.remove()
    _, size, _ = reference.state
    with torch.no_grad():
        tokens, weight = normed[0][:, 1:], size[:, 1:]
        pooled = (tokens * weight).sum(1) / weight.sum(1)
        assert (logits - model.head(model.fc_norm(pooled))).abs().max() < TOL
    assert weight.sum(1).eq(196).all()


# ---------------------------------------------------------------------------------------------- (4)(5) text


def test_merging_only_padding_keeps_the_embedding(minilm, sentences):
    _, attention_mask = sentences
    expected = run(minilm.model, *sentences)
    plan = {i: ToMe(r=8) for i in range(6)}  # 48 tokens removed; every row has >= 110 padding tokens
    reference = compressed_reference(minilm, plan)
    embedding = run(reference, *sentences)
    assert reference.token_counts[-1] == (88, 80)
    _, size, mask = reference.state
    lengths = attention_mask.sum(1).float()
    assert torch.equal(mask.sum(1), lengths)  # no real token merged ...
    assert torch.equal((mask * size[..., 0]).sum(1), lengths)  # ... and none absorbed padding
    assert F.cosine_similarity(embedding, expected).min() > 0.99999


def test_strong_merging_keeps_unit_norm(minilm, sentences):
    reference = compressed_reference(minilm, {i: ToMe(r=1000) for i in range(6)})
    embedding = run(reference, *sentences)
    assert reference.token_counts == [(128, 65), (65, 33), (33, 17), (17, 9), (9, 5), (5, 3)]
    assert torch.isfinite(embedding).all()
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(len(embedding)), atol=1e-5)
    _, size, mask = reference.state
    # Every original real token is still accounted for in the pooled weight.
    assert ((mask * size[..., 0]).sum(1) >= sentences[1].sum(1)).all()


def test_bert_mask_is_rebuilt_after_merge(tiny_bert, tiny_inputs):
    """After a merge, padding keys stay masked: changing padded input ids changes no real token's output."""
    ids, mask = tiny_inputs
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 1) % 120
    reference = compressed_reference(tiny_bert, {0: ToMe(r=2)})
    first, second = run(reference, ids, mask), run(reference, other, mask)
    real = reference.state.mask.bool()
    # Row 0 has no padding; in rows 1 and 2 the real tokens' outputs must not see the changed padding.
    assert (first[real] - second[real]).abs().max() < TOL


# ---------------------------------------------------------------------------------------------- (6) source intact


def test_source_model_is_not_modified(vit, images, tiny_bert, tiny_inputs):
    before = run(vit.model, images)
    state = {k: v.clone() for k, v in vit.model.state_dict().items()}
    reference = compressed_reference(vit, {0: ToMe(r=8), 5: ToMe(r=8)})
    run(reference, images)
    assert torch.equal(run(vit.model, images), before)
    assert all(torch.equal(state[k], v) for k, v in vit.model.state_dict().items())
    assert type(vit.model.blocks[0]).__name__ == "Block" and "pool" not in vars(vit.model)

    before = run(tiny_bert.model, *tiny_inputs)
    run(compressed_reference(tiny_bert, {0: ToMe(r=4)}), *tiny_inputs)
    assert torch.equal(run(tiny_bert.model, *tiny_inputs), before)
    assert type(tiny_bert.model.model.encoder.layer[0]).__name__ == "BertLayer"


# ---------------------------------------------------------------------------------------------- (7) usage errors


@pytest.mark.parametrize("plan, message", [
    ({12: ToMe(r=8)}, "out of range"),
    ({-1: ToMe(r=8)}, "out of range"),
    ({"0": ToMe(r=8)}, "block indices"),
    ({0: "tome"}, "method instance"),
    ([ToMe(r=8)], "block index -> method"),
])
def test_bad_plans(vit, plan, message):
    with pytest.raises(UsageError, match=message):
        compressed_reference(vit, plan)


def test_models_without_global_self_attention_are_refused(vit):
    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    with pytest.raises(UsageError, match="no self-attention"):
        compressed_reference(dataclasses.replace(vit, model=convnet), {})


def test_max_pooling_pools_the_compressed_tokens(vit, images):
    """Max over tokens needs no weights: it is taken over the tokens that are left, as the graph does."""
    model = copy.deepcopy(vit.model)
    model.global_pool = "max"
    source = dataclasses.replace(vit, model=model)
    reference = compressed_reference(source, {i: ToMe(r=8) for i in range(12)})
    normed = []
    hook = reference.model.norm.register_forward_hook(lambda module, args, out: normed.append(out))
    logits = run(reference, images)
    hook.remove()
    with torch.no_grad():
        assert (logits - model.head(model.fc_norm(normed[0][:, 1:].amax(1)))).abs().max() < TOL


def test_mismatched_batch_or_seq(tiny_bert, tiny_inputs):
    ids, mask = tiny_inputs
    reference = compressed_reference(tiny_bert, {0: ToMe(r=2)})
    with pytest.raises(UsageError, match="differ in batch/seq"):
        reference(ids, mask[:, :12])
    with pytest.raises(UsageError, match="differ in batch/seq"):
        reference(ids, mask[:2])
