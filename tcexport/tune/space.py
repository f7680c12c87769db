"""The search space: plan shapes drawn from the model's block/token structure, and their intensity.

A shape says which method runs where and how the amount varies over the chosen blocks (method or an
early/late pair of methods, first and last block, every k-th block, a slope: more early or more late). Its
intensity (0: nothing removed, 1: the most the methods allow) is not searched but solved, so every trial lands
on the budget: the optimizer spends its trials on where and how to compress, not on how much.

Plans are lists of stages in `tcexport compress --stage` form ('tome:r=8@0,1', 'topk:keep=0.7@3'), which the
recipe schema and compress.plan.plan_stages take as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tcexport import methods
from tcexport.core.errors import UsageError

MERGING = ("tome", "adjacent")  # r tokens merged per block
KEEPING = ("topk", "random", "uniform")  # a share of the unprotected tokens kept
SEARCHABLE = (*MERGING, *KEEPING, "prune-merge")
DEFAULT_METHODS = ("tome", "topk", "prune-merge")
MAX_SHARE_REMOVED = 0.9  # keep/prune-merge at intensity 1 keep a tenth of the unprotected tokens
CONTEXTUAL_SHARE = 0.12  # prune-merge: of the tokens kept, the share that are merged contextual tokens


@dataclass(frozen=True)
class Structure:
    """What the search space is drawn from: the model's blocks and the tokens entering the first one."""

    depth: int
    tokens: int
    protected: int
    width: int  # hidden width, for the FLOP proxy


@dataclass(frozen=True)
class Shape:
    methods: tuple[str, ...]  # one method, or (early, late) for a mixed plan
    start: int
    stop: int
    every: int = 1
    slope: float = 0.0  # > 0: more removed in the early chosen blocks, < 0: in the late ones
    split: float = 0.5  # mixed plans: the share of chosen blocks that get the first method

    def blocks(self) -> list[int]:
        return list(range(self.start, self.stop + 1, self.every))

    def to_json(self) -> dict:
        return {**asdict(self), "methods": list(self.methods)}

    def assignments(self) -> list[tuple[int, str]]:
        """(block, method) for every chosen block: a mixed plan's first method takes the first `split` of them."""
        chosen = self.blocks()
        first = max(1, int(round(self.split * len(chosen)))) if len(self.methods) > 1 else len(chosen)
        return [(block, self.methods[0] if i < first else self.methods[-1]) for i, block in enumerate(chosen)]

    def key(self) -> tuple:
        """What decides the plan: equal keys give equal stages (a slope means nothing on one block)."""
        assigned = tuple(self.assignments())
        return assigned, round(self.slope, 3) if len(assigned) > 1 else 0.0

    def describe(self) -> str:
        parts: dict[str, list[str]] = {}
        for block, name in self.assignments():
            parts.setdefault(name, []).append(str(block))
        plan = " + ".join(f"{name}@{','.join(blocks)}" for name, blocks in parts.items())
        return f"{plan} slope {self.slope:+.2f}"


def parse_methods(text: str | None) -> tuple[str, ...]:
    """--methods tome,topk: registered methods tune knows how to size (pool and query are not searched)."""
    if text is None:
        return DEFAULT_METHODS
    names = tuple(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    if not names:
        raise UsageError(f"--methods must list methods, e.g. tome,topk; got '{text}'")
    for name in names:
        methods.get(name)  # unknown -> the registry's own one-line error
        if name not in SEARCHABLE:
            raise UsageError(f"--methods: tune cannot size '{name}' per block; choose from {', '.join(SEARCHABLE)}")
    return names


def method_choices(names: tuple[str, ...]) -> list[str]:
    """Single methods, then early+late pairs (the multi-stage plans --stage expresses)."""
    pairs = [f"{a}+{b}" for a in names for b in names if a != b]
    return list(names) + pairs


def structured_start(names: tuple[str, ...], structure: Structure) -> list[dict]:
    """Trial parameters tried first: constant, decreasing, late-only and few-layers plans per method."""
    last = structure.depth - 1
    late = structure.depth // 2
    second = min(1, last)
    per_method = [[dict(method=name, start=0, stop=last, every=1, slope=0.0),  # constant, all blocks
                   dict(method=name, start=0, stop=last, every=1, slope=1.0),  # decreasing
                   dict(method=name, start=late, stop=last, every=1, slope=0.0),  # late only
                   dict(method=name, start=second, stop=last, every=2, slope=0.0),  # few layers
                   dict(method=name, start=second, stop=max(second, late), every=2, slope=0.0)]  # few, early
                  for name in names]
    # Interleave: every method's constant plan comes before any method's second seed.
    return [seeds[k] for k in range(len(per_method[0])) for seeds in per_method]


def shape_from_params(params: dict, structure: Structure) -> Shape:
    names = tuple(str(params["method"]).split("+"))
    start = min(int(params["start"]), structure.depth - 1)
    stop = min(max(int(params.get("stop", start)), start), structure.depth - 1)
    return Shape(names, start, stop, max(1, int(params.get("every", 1))), float(params.get("slope", 0.0)),
                 float(params.get("split", 0.5)))


def suggest(trial, names: tuple[str, ...], structure: Structure) -> Shape:
    """An optuna trial's shape; the parameter names match structured_start's."""
    last = structure.depth - 1
    params = {"method": trial.suggest_categorical("method", method_choices(names)),
              "start": trial.suggest_int("start", 0, last)}
    params["stop"] = trial.suggest_int("stop", 0, last)
    params["every"] = trial.suggest_int("every", 1, 3)
    params["slope"] = trial.suggest_float("slope", -1.0, 1.0)
    if "+" in params["method"]:
        params["split"] = trial.suggest_float("split", 0.2, 0.8)
    return shape_from_params(params, structure)


# ---------------------------------------------------------------------------------------------- shape -> stages


@dataclass
class Sized:
    """A shape at one intensity: the stages, and the tokens entering/leaving every block."""

    stages: list[str]
    tokens: list[tuple[int, int]]

    def token_ratio(self, structure: Structure) -> float:
        """Mean over blocks of (tokens in + out) / 2, over the uncompressed count (BENCHMARKS.md's measure)."""
        return sum((a + b) / 2 for a, b in self.tokens) / (len(self.tokens) * structure.tokens)

    def flop_proxy(self, structure: Structure) -> float:
        """Blocks' FLOPs relative to uncompressed: projections and attention on the tokens in, MLP on the tokens
        out (per token 8d^2 + 4nd before the method, 16d^2 after). Only a guide: budgets are measured."""
        d = structure.width

        def cost(n_in: int, n_out: int) -> float:
            return 8 * d * n_in + 4 * n_in * n_in + 16 * d * n_out

        full = cost(structure.tokens, structure.tokens) * len(self.tokens)
        return sum(cost(a, b) for a, b in self.tokens) / full


def _params(name: str, amount: float, n: int, protected: int, first: int) -> dict | None:
    """The method's parameters removing `amount` (0..1) of what it can at a block with n tokens; None: nothing.

    Merging counts r on the first block's tokens (`first`), so an even amount is ToMe's constant r (capped where
    fewer tokens are left); keeping takes a share of the block's own tokens, as topk's keep does."""
    free = n - protected
    if free < 2 or amount <= 0:
        return None
    if name in MERGING:
        r = min(free // 2, int(round(amount * (first - protected) / 2)))
        return {"r": r} if r > 0 else None
    kept = max(1, int(round((1 - MAX_SHARE_REMOVED * amount) * free)))
    if kept >= free:
        return None
    if name in KEEPING:
        return {"keep_count": kept}
    contextual = max(1, int(round(kept * CONTEXTUAL_SHARE)))
    if kept - contextual < 1:
        return None
    return {"dominant": kept - contextual, "contextual": contextual}


def size(shape: Shape, intensity: float, structure: Structure) -> Sized:
    assigned = dict(shape.assignments())
    chosen = list(assigned)
    stages, tokens = [], []
    n = structure.tokens
    for block in range(structure.depth):
        n_out = n
        if block in assigned:
            i, name = chosen.index(block), assigned[block]
            position = i / (len(chosen) - 1) if len(chosen) > 1 else 0.5
            weight = (1 + shape.slope * (0.5 - position)) / (1 + abs(shape.slope) * 0.5)
            params = _params(name, intensity * weight, n, structure.protected, structure.tokens)
            if params is not None:
                n_out = methods.get(name)(**params).tokens_out(n, structure.protected)
                args = ",".join(f"{k}={v}" for k, v in params.items())
                stages.append(f"{name}:{args}@{block}")
        tokens.append((n, n_out))
        n = n_out
    return Sized(stages, tokens)


def solve(shape: Shape, structure: Structure, target: float, measure: str = "flops") -> tuple[float, Sized]:
    """The lowest intensity whose proxy (flop_proxy or token_ratio) is at or below target, by bisection."""

    def proxy(sized: Sized) -> float:
        return sized.token_ratio(structure) if measure == "tokens" else sized.flop_proxy(structure)

    strongest = size(shape, 1.0, structure)
    if proxy(strongest) > target:
        return 1.0, strongest
    low, high = 0.0, 1.0
    for _ in range(24):
        middle = (low + high) / 2
        if proxy(size(shape, middle, structure)) <= target:
            high = middle
        else:
            low = middle
    return high, size(shape, high, structure)
