"""Positions: the rule (a compressed token stands at its largest constituent's position), the gather of position
terms, and that the zoo's position terms really depend on it (so the family tests cannot pass by ignoring it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcexport.models import sources
from tcexport.models import zoo
from tcexport.core.errors import UsageError
from tcexport.methods.query import QueryPrune
from tcexport.methods.tome import ToMe
from tcexport.methods.topk import TopK
from tcexport.reference import compressed_reference
from tcexport.reference.flow import TokenFlow
from tcexport.reference.positions import follow_tokens, gather_positions


def merged_flow(sizes: list[float]) -> TokenFlow:
    """Four tokens; token 0 (A) merges into token 1 (B) under ToMe(r=1), no protected tokens."""
    flow = TokenFlow({0: ToMe(r=1)}, protected=0, prop_attn=True)
    flow.begin(None)
    flow.start(1, 4, torch.device("cpu"))
    flow.size = torch.tensor(sizes).reshape(1, 4, 1)
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])
    flow.compress(0, torch.randn(1, 4, 3), metric, None)
    return flow


def test_equal_sizes_keep_the_earlier_token_position():
    # ToMe lays out [unmerged A (token 2), B (token 1 with 0 merged in, token 3)]
    assert merged_flow([1, 1, 1, 1]).positions().tolist() == [[2, 0, 3]]


def test_the_larger_constituent_keeps_its_position():
    assert merged_flow([1, 3, 1, 1]).positions().tolist() == [[2, 1, 3]]
    assert merged_flow([5, 3, 1, 1]).positions().tolist() == [[2, 0, 3]]


def test_positions_chain_through_stages_and_pruning_gathers():
    flow = TokenFlow({0: TopK(keep_count=2), 1: TopK(keep_count=1)}, protected=1, prop_attn=True)
    flow.begin(None)
    flow.start(1, 5, torch.device("cpu"))
    probs = torch.tensor([0.0, 0.1, 0.4, 0.2, 0.3]).reshape(1, 1, 1, 5).expand(1, 1, 5, 5)
    flow.compress(0, torch.randn(1, 5, 3), None, probs)  # keeps CLS, then tokens 2 and 4 (by score)
    assert flow.positions().tolist() == [[0, 2, 4]]
    probs = torch.tensor([0.0, 0.2, 0.8]).reshape(1, 1, 1, 3).expand(1, 1, 3, 3)
    flow.compress(1, torch.randn(1, 3, 3), None, probs)
    assert flow.positions().tolist() == [[0, 4]]


def test_gather_positions_takes_rows_and_columns_per_batch_row():
    flow = merged_flow([1, 1, 1, 1])
    bias = (10 * torch.arange(4)[:, None] + torch.arange(4)[None, :]).float().reshape(1, 1, 4, 4)
    gathered = gather_positions(flow, bias, {2: 3, 3: 3})
    assert gathered[0, 0].tolist() == [[22, 20, 23], [2, 0, 3], [32, 30, 33]]


def test_a_term_over_the_tokens_after_a_prefix_is_shifted():
    flow = TokenFlow({0: TopK(keep_count=2)}, protected=1, prop_attn=True)
    flow.begin(None)
    flow.start(1, 5, torch.device("cpu"))
    probs = torch.tensor([0.0, 0.1, 0.4, 0.2, 0.3]).reshape(1, 1, 1, 5).expand(1, 1, 5, 5)
    flow.compress(0, torch.randn(1, 5, 3), None, probs)  # positions [0, 2, 4]
    rope = torch.arange(4).float()[:, None].expand(4, 2)  # rows for tokens 1..4, as EVA's rotary table
    q = torch.zeros(1, 1, 2, 2)  # the two non-prefix tokens
    assert follow_tokens(flow, rope, q, from_mask=False)[0, 0, :, 0].tolist() == [1, 3]


def test_mask_terms_are_rebuilt_not_gathered():
    flow = merged_flow([1, 1, 1, 1])
    flow.mask = torch.tensor([[1.0, 0.0, 1.0]])
    rebuilt = follow_tokens(flow, torch.zeros(1, 1, 1, 4), torch.zeros(1, 2, 3, 3), from_mask=True)
    assert rebuilt[0, 0, 0, 1] == torch.finfo(torch.float32).min and rebuilt[0, 0, 0, 0] == 0


def test_query_pruning_refuses_position_terms():
    flow = TokenFlow({0: QueryPrune(keep_count=2)}, protected=1, prop_attn=True)
    flow.begin(None, {"query": torch.randn(1, 3)})
    flow.start(1, 4, torch.device("cpu"))
    flow.compress(0, torch.randn(1, 4, 3), None, None)
    with pytest.raises(UsageError, match="position terms"):
        flow.positions()


@pytest.fixture(scope="module")
def beit():
    return sources.load("timm:beit_base_patch16_224", model_args=zoo.timm_model_args("beit_base_patch16_224"))


def test_the_zoo_position_terms_depend_on_the_positions(beit, monkeypatch):
    """BEiT's relative position bias changes the output when positions are wrong: following them is tested."""
    images = beit.example_inputs(2, seed=3)[0]
    plan = {0: ToMe(r=4)}
    with torch.no_grad():
        right = compressed_reference(beit, plan)(images)
        monkeypatch.setattr(TokenFlow, "positions",
                            lambda self: torch.arange(self.count).expand(self.size.shape[0], -1))
        wrong = compressed_reference(beit, plan)(images)
    assert float((right - wrong).abs().max()) > 1e-3 * float(right.abs().max())
    assert np.isfinite(right.numpy()).all()
