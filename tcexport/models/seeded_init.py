"""Seeded random weights that exercise every path of a model.

A model's own random init leaves some weights at values that hide mistakes: layer scale starts near 1e-5
(DeiT-III, DINOv2, BEiT, EVA), so a wrong branch after attention barely moves the output, and relative
position bias tables start at zero (BEiT) or near it (MPNet, Swin: std 0.02), so a bias that fails to follow
the tokens changes almost nothing. `exercise`
redraws exactly those weights, deterministically from a seed, so a rebuilt model hashes the same.
"""

from __future__ import annotations

import re

import torch

LAYER_SCALE_RANGE = (0.5, 1.0)
POSITION_BIAS_STD = 0.5  # large enough to move softmax logits of O(1), small enough not to saturate them
FAINT = 0.1  # a position bias no larger than this barely moves the attention

# Last name component of a layer-scale parameter: timm ls1.gamma, BEiT/EVA gamma_1, HF Dinov2 lambda1,
# HF BEiT lambda_1, HF ConvNeXt layer_scale_parameter.
_LAYER_SCALE_NAME = re.compile(r"^(gamma(_?\d)?|lambda_?\d*|layer_scale\w*)$")
# A learned relative position bias, looked up per token pair: BEiT/Swin/HF tables, MPNet's bias embedding,
# SAM-style rel_pos_h/w. (Not the weights of an MLP that generates the bias: those have a scale of their own.)
_POSITION_BIAS_NAME = re.compile(r"(relative_position_bias_table|relative_attention_bias|rel_pos_[hw])")


def is_layer_scale(module: torch.nn.Module, param_name: str, param: torch.Tensor) -> bool:
    """A per-channel scale on a residual branch: 1-D, in a LayerScale-like module or named like one."""
    if param.dim() != 1:
        return False
    return "layerscale" in type(module).__name__.lower() or bool(_LAYER_SCALE_NAME.match(param_name))


def is_faint_position_bias(qualified_name: str, param: torch.Tensor) -> bool:
    """A relative position bias (table or embedding) initialised at or near zero."""
    if not _POSITION_BIAS_NAME.search(qualified_name) or param.numel() == 0:
        return False
    return float(param.detach().abs().max()) <= FAINT


@torch.no_grad()
def exercise(model: torch.nn.Module, seed: int) -> dict[str, int]:
    """Redraw layer scales from U[0.5, 1] and faint position biases from N(0, 0.5^2), seeded.

    Parameters are visited in sorted name order with one generator, so the result depends only on the
    model's structure and `seed`. Shared parameters (ALBERT) are drawn once. Returns how many were redrawn.
    """
    generator = torch.Generator().manual_seed(int(seed))
    low, high = LAYER_SCALE_RANGE
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(id(param), (qualified, module, param_name, param))
    counts = {"layer_scale": 0, "position_bias": 0}
    for qualified, module, param_name, param in sorted(owners.values(), key=lambda item: item[0]):
        if is_layer_scale(module, param_name, param):
            drawn = torch.rand(param.shape, generator=generator, dtype=torch.float64) * (high - low) + low
            counts["layer_scale"] += 1
        elif is_faint_position_bias(qualified, param):
            drawn = torch.randn(param.shape, generator=generator, dtype=torch.float64) * POSITION_BIAS_STD
            counts["position_bias"] += 1
        else:
            continue
        param.copy_(drawn.to(param.dtype))
    return counts
