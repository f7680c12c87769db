"""FastV and PyramidDrop: prune the prompt in the prefill by the attention the last prompt token pays it.

FastV (Chen et al., 2024) ranks the span's tokens at one layer by the last token's attention, averaged over heads,
and later layers see only the kept ones: `fastv:keep=0.5@2` keeps half after layer 2 (the paper's K=3, R=50%),
the layer's own cache stays whole. PyramidDrop (Xing et al., 2024) does the same at several layers with
shrinking budgets: `pdrop:keep=0.5,0.25,0.125@8,16,24` (shares of the prompt's span left after each stage).
Both keep the kept tokens' original position ids (FastV's code does; llmc's PyramidDrop renumbers them).
The selection is methods/decoder.py's; the mechanism around it is the same for every decoder method.
"""

from __future__ import annotations

from tcexport.methods.decoder import DecoderMethod, keep_params, span_param
from tcexport.methods.keep import KEEP_EXCLUSIVE
from tcexport.methods.registry import register


@register
class FastV(DecoderMethod):
    """Prompt pruning at one layer by the last token's attention (FastV)."""

    name = "fastv"
    family = "prefill pruning (decoders)"
    parameters = (*keep_params(0.5), span_param())
    exclusive = KEEP_EXCLUSIVE


@register
class PyramidDrop(FastV):
    """Prompt pruning at several layers with shrinking budgets (PyramidDrop)."""

    name = "pdrop"  # FastV's parameters and selection; the difference is the plan: several layers, cumulative keep
