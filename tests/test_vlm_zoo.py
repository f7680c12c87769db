"""The tiny VLM zoo (tcexport.models.vlm_zoo, groundwork for issue 20): each class builds from its saved
directory through transformers' Auto class, gives the LLM the image-token count the zoo states, and is not
degenerate: greedy tokens vary with the image and with the prompt, and repeat no token for long.

LLaVA takes the default run; the other classes are `slow`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from tcexport.models import vlm_zoo
from tests.conftest import made_once

KIND_PARAMS = [pytest.param(k, marks=[] if k == "llava" else [pytest.mark.slow]) for k in vlm_zoo.KINDS]


def _pixels(kind: str, seed: int) -> torch.Tensor:
    pixels = torch.randn(1, 3, vlm_zoo.IMAGE_SIZE, vlm_zoo.IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    return pixels[:, None] if kind == "idefics3" else pixels  # Idefics3: [batch, images, 3, H, W]


def _greedy(model, kind: str, ids: list[int], seed: int, new_tokens: int = 10) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values=_pixels(kind, seed),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_vlm_builds_counts_its_image_tokens_and_is_not_degenerate(tmp_path_factory, kind):
    import transformers

    root = made_once(tmp_path_factory, f"vlm_zoo_{kind}", lambda r: vlm_zoo.vlm_dir(kind, r))
    directory = vlm_zoo.vlm_dir(kind, root)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert tokenizer.convert_tokens_to_ids(vlm_zoo.IMAGE_TOKEN_TEXT) == vlm_zoo.IMAGE_TOKEN
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(directory),
                                                                     attn_implementation="eager").eval()
    assert type(model).__name__ == vlm_zoo.VLMS[kind][0]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=_pixels(kind, 0)).pooler_output
    assert [tuple(f.shape) for f in features] == [(vlm_zoo.image_tokens(kind), model.config.text_config.hidden_size)]
    prompt = vlm_zoo.prompt_with_image(kind, [1, 504, 3575], [282, 4649, 314])
    tokens = _greedy(model, kind, prompt, seed=0)
    assert tokens != _greedy(model, kind, prompt, seed=1)  # the image reaches the LLM
    other = vlm_zoo.prompt_with_image(kind, [1, 9906, 1689], [17, 260, 44])
    assert tokens != _greedy(model, kind, other, seed=0)  # so does the text
    longest_run = max(sum(1 for _ in group) for _, group in itertools.groupby(tokens))
    assert len(set(tokens)) >= 6 and longest_run <= 3, tokens


def test_unknown_vlm_kind_is_refused_before_writing(tmp_path):
    with pytest.raises(KeyError, match="unknown VLM kind"):
        vlm_zoo.vlm_dir("blip9", tmp_path)
    assert list(tmp_path.iterdir()) == []
