"""The method contract: one spec, two implementations (PyTorch reference and ONNX builder).

Every token-compression method works on the same token state between a block's attention and its MLP:

    x      [B, N, C]  float  hidden states (the residual stream)
    metric [B, N, Ck] float  what the method measures similarity/importance with (e.g. head-averaged keys)
    size   [B, N, 1]  float  how many original tokens each token stands for
    mask   [B, N]     float  1 = real token, 0 = padding; None when there is no padding (vision)
    protected: int           leading tokens that are never compressed and stay first (CLS, distill token)

and returns the new (x, size, mask) with `tokens_out(N, protected)` tokens. The count is static: it depends on
the parameters and N only, never on the data, so engines keep static shapes.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import onnx_ir as ir
from onnx_ir import tape

from tcexport.core.errors import UsageError
from tcexport.core.lazy import lazy_import
from tcexport.methods.params import Param, check_declaration, check_declared
from tcexport.methods.plugin import PluginSpec

torch = lazy_import("torch")  # the references need it; the declarations do not


class TokenState(NamedTuple):
    """(x, size, mask): what a method takes and returns. A tuple, so `x, size, mask = ...` works."""

    x: Any
    size: Any
    mask: Any | None


class Method(abc.ABC):
    """A token-compression method. Subclasses set `name`, declare their parameters and implement the members below.

    Construct with keyword parameters (`ToMe(r=8)`); they are checked at once against the declaration (type,
    range, exclusive groups, defaults) and a bad value raises UsageError with a one-line message. The checked
    parameters are in `self.params`. Everything that takes method parameters (the `compress` options, --stage
    text, recipes, the README's method table) reads `parameters`, so a new method is one file.
    """

    name: ClassVar[str]
    family: ClassVar[str] = ""  # the README's family column: "similarity merging", "attention pruning", ...
    parameters: ClassVar[tuple[Param, ...]] = ()
    # Groups of parameters of which exactly one is given (keep / keep_count).
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # The TensorRT plugin that stands in for the method's --impl function/plugin node; None: op type Token<Name>
    # and no plugin fields. Its fields come from plugin_fields().
    plugin: ClassVar[PluginSpec | None] = None
    # What the method decides with, besides the token state. "keys": the block's attention keys averaged over
    # heads (the `metric` argument, [B, N, d]); "cls_attention": the CLS token's attention over all tokens,
    # averaged over heads ([B, N], in signals). The rewriter builds only what a method asks for.
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})
    # Whether the method decides from x itself. Positions of its tokens are measured by running it on one-hot x
    # (reference/flow.py, graph/positions.py), which only works when x does not change its decisions.
    decides_from_x: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.params: dict[str, Any] = self.check_params(dict(params))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def check_declaration(cls) -> None:
        """TypeError when the declaration cannot work (called by @register)."""
        check_declaration(cls.__qualname__, cls.parameters, cls.exclusive)

    @classmethod
    def summary(cls) -> str:
        """What the method does, in one line: the first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Return the validated parameters (defaults filled in); raise UsageError on bad or unknown ones."""
        return cls.check_more(check_declared(cls.name, cls.parameters, cls.exclusive, params))

    @classmethod
    def check_more(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Rules between parameters that a declaration cannot say; the checked parameters come in."""
        return params

    def plugin_fields(self, n_in: int, n_out: int, protected: int) -> dict[str, int]:
        """The INT fields of this block's plugin node (its spec's `fields`), from the token counts around it."""
        return {}

    @abc.abstractmethod
    def tokens_out(self, n_in: int, protected: int) -> int:
        """Token count after this method for n_in tokens in, known at rewrite time (no data needed)."""

    def check_positions_measurable(self) -> None:
        """Raise UsageError when the model has position terms and this method cannot say where its tokens stand."""
        if self.decides_from_x:
            raise UsageError(f"the {self.name} method decides from the hidden states themselves, so tcexport cannot "
                             "tell which position its tokens hold; this model has position terms (relative position "
                             "bias or rotary embeddings) inside attention: use tome, topk, prune-merge, adjacent or "
                             "pool")

    def check_fits(self, n_in: int, protected: int) -> None:
        """Raise UsageError when the parameters ask for more than a block with n_in tokens allows."""

    @abc.abstractmethod
    def reference(self, x: torch.Tensor, metric: torch.Tensor | None, size: torch.Tensor,
                  mask: torch.Tensor | None, protected: int, signals: dict | None = None) -> TokenState:
        """Eager PyTorch implementation: the ground truth the ONNX graph is validated against."""

    @abc.abstractmethod
    def build_onnx(self, op: tape.Tape, x: ir.Value, metric: ir.Value | None, size: ir.Value,
                   mask: ir.Value | None, n_in: int, protected: int,
                   name_prefix: str = "tc", signals: dict | None = None) -> TokenState:
        """Record the method as standard ONNX nodes on `op` and return the output values.

        Only nodes are recorded (constants are Constant nodes, no initializers), every node and value name
        starts with `name_prefix`, and when the method does nothing the input values are returned as they are.
        """
