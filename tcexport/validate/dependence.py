"""Does each output still depend on the inputs it depended on, and only on those? Values agreeing with the eager
reference are not enough: when both sides share a mistake (a causal mask rebuilt as a padding mask on both), they
agree on a model that changed meaning. This check knows no family: it perturbs input tokens and watches which
output rows move, in the uncompressed model and in the compressed one.

Perturbations (at batch 1, every token real: the attention mask is all ones and is never changed): the late
quarter of the tokens, the middle token and the last one. The token axis of an input is the longest axis after
the batch (token ids [B, N]: N; an image [B, C, H, W]: H, so the late tokens are the last patch rows; audio and
spectrograms: time). Token ids get other ids, float inputs added noise; other inputs stay as they are.

An output row "moves" when it changes by more than CHANGED times the output's scale (its largest magnitude), and
stays when it changes by at most SAME times it. For each perturbation and each row of the compressed output
with a known counterpart in the uncompressed output:

    appeared   the uncompressed row stays, the compressed row moves: the compressed model lets that row see tokens
               it could not see before (a causal or windowed mask that compression broke). Fails validate.
    vanished   the uncompressed row moves, the compressed row stays: a dependence was cut. Fails validate.

Counterparts: the same row when the output's shape did not change; after a compression, the row of the original
token each compressed token stands at (its largest constituent's position, from the reference: the rule position
terms follow), else only the protected leading tokens. A pooled output (no token axis, [B, C]) depends on every
token in both models, so the check says nothing about it: 'not applicable' (it is checked when the uncompressed
pooled output does not move). Cost: 1 + 3 runs of each model at batch 1, plus one reference run for the positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tcexport.models.inputs import FLOAT, TOKEN_IDS, InputSpec, random_feeds

SAME = 1e-6  # a row that changes by at most this (times the output's scale) did not move
CHANGED = 1e-4  # a row that changes by more than this moved
PASSED, FAILED, NOT_APPLICABLE = "passed", "failed", "not applicable"
SHOWN = 6  # rows listed per finding in the report

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class DependenceReport:
    status: str  # PASSED, FAILED or NOT_APPLICABLE, over all outputs
    perturbations: list[str] = field(default_factory=list)
    outputs: dict[str, dict] = field(default_factory=dict)
    note: str = ""
    batch: int = 1

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def to_json(self) -> dict:
        return {"status": self.status, "perturbations": self.perturbations, "outputs": self.outputs,
                "note": self.note, "batch": self.batch, "same": SAME, "changed": CHANGED}


def token_axis(spec: InputSpec, shape: tuple[int, ...]) -> int | None:
    """The axis the tokens lie along: the longest after the batch (the first of equals), None for scalars."""
    if len(shape) < 2:
        return None
    rest = list(shape[1:])
    return 1 + rest.index(max(rest))


def perturbable(specs: list[InputSpec]) -> list[InputSpec]:
    return [s for s in specs if s.kind in (TOKEN_IDS, FLOAT)]


def perturbations(length: int) -> list[tuple[int, int]]:
    """[start, end) spans along a token axis of `length`: the late quarter, the middle token, the last token."""
    late = max(1, length // 4)
    spans = [(length - late, length), (length // 2, length // 2 + 1), (length - 1, length)]
    return list(dict.fromkeys(spans))


def perturb(feeds: dict[str, np.ndarray], specs: list[InputSpec], span: tuple[int, int], length: int,
            seed: int) -> dict:
    """`feeds` with every perturbable input changed over `span` of a token axis `length` long (scaled to each
    input's own token axis; token ids: other ids; floats: added noise)."""
    rng = np.random.default_rng(seed)
    out = dict(feeds)
    for spec in perturbable(specs):
        value = feeds[spec.name].copy()
        axis = token_axis(spec, value.shape)
        own = value.shape[axis]
        start = span[0] * own // length
        end = max(span[1] * own // length, start + 1)
        index = [slice(None)] * value.ndim
        index[axis] = slice(start, end)
        index = tuple(index)
        if spec.kind == TOKEN_IDS:
            high = int(spec.high or 1000)
            region = value[index]
            shift = 1 + rng.integers(0, max(high - 1, 1), size=region.shape)
            value[index] = ((region + shift) % high).astype(value.dtype)
        else:
            value[index] = value[index] + rng.standard_normal(value[index].shape).astype(value.dtype)
        out[spec.name] = value
    return out


def _rows(value: np.ndarray) -> np.ndarray:
    """Batch row 0 as [rows, features]: axis 1 are the rows of a token output, a pooled output is one row."""
    first = np.asarray(value, dtype=np.float64)[0]
    return first.reshape(1, -1) if first.ndim == 1 else first.reshape(first.shape[0], -1)


def _moved(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per row: the largest change, relative to the base's scale."""
    scale = max(float(np.abs(base).max()), 1e-12)
    return np.abs(other - base).max(axis=1) / scale


def _counterparts(uncompressed: np.ndarray, compressed: np.ndarray, positions: np.ndarray | None,
                  protected: int) -> tuple[dict[int, int], str]:
    """{compressed row: uncompressed row} and how they were matched."""
    rows_u, rows_c = uncompressed.shape[0], compressed.shape[0]
    if uncompressed.shape == compressed.shape:
        return {k: k for k in range(rows_c)}, "the same rows"
    if positions is not None and len(positions) == rows_c and int(np.max(positions)) < rows_u:
        return {k: int(p) for k, p in enumerate(positions)}, "each token's original position"
    return {k: k for k in range(min(protected, rows_c, rows_u))}, "the protected leading tokens only"


def check(specs: list[InputSpec], outputs: list[str], uncompressed: Run, compressed: Run,
          positions: Callable[[dict], np.ndarray | None], protected: int, extra: dict | None = None,
          batch: int = 1, seed: int = 0) -> DependenceReport:
    """Run the check (module doc). `uncompressed`/`compressed` map feeds to {output name: array}; `positions` gives,
    for the base feeds, the original index each compressed token stands at (batch row 0), or None; `extra`: feeds
    the compressed model takes besides `specs` (held fixed)."""
    chosen = perturbable(specs)
    if not chosen:
        return DependenceReport(NOT_APPLICABLE, note="no token-id or float input to perturb", batch=batch)
    base = random_feeds(specs, batch, seed)  # attention masks all ones: every token real
    first = base[chosen[0].name]
    axis = token_axis(chosen[0], first.shape)
    spans = perturbations(first.shape[axis])
    name = chosen[0].name
    if chosen[0].kind == TOKEN_IDS:
        labels = [f"{name} tokens {a}-{b - 1}" if b - a > 1 else f"{name} token {a}" for a, b in spans]
    else:
        labels = [f"{name} axis {axis} at {a}-{b - 1}" if b - a > 1 else f"{name} axis {axis} at {a}" for a, b in spans]
    extra = dict(extra or {})
    base_u, base_c = uncompressed(base), compressed({**base, **extra})
    where = positions({**base, **extra})
    report = DependenceReport(PASSED, labels, batch=batch)
    moved = [(uncompressed(fed), compressed({**fed, **extra}))
             for fed in (perturb(base, specs, span, first.shape[axis], seed + 1 + i) for i, span in enumerate(spans))]
    for name in outputs:
        report.outputs[name] = _check_output(name, base_u, base_c, moved, labels, where, protected)
    statuses = [o["status"] for o in report.outputs.values()]
    report.status = (FAILED if FAILED in statuses else PASSED if PASSED in statuses else NOT_APPLICABLE)
    return report


def _check_output(name, base_u, base_c, moved, labels, where, protected) -> dict:
    u0, c0 = base_u.get(name), base_c.get(name)
    if u0 is None or c0 is None or not np.issubdtype(np.asarray(c0).dtype, np.floating) or np.asarray(u0).ndim < 2:
        return {"status": NOT_APPLICABLE, "why": "not a float output with a batch axis"}
    rows_u, rows_c = _rows(u0), _rows(c0)
    pooled = np.asarray(u0).ndim == 2
    matched, how = _counterparts(rows_u, rows_c, where, protected)
    if not matched:
        return {"status": NOT_APPLICABLE, "why": "no row of the compressed output has a known counterpart"}
    result = {"status": PASSED, "matched_by": how, "rows_checked": len(matched), "independent": {}, "appeared": [],
              "vanished": []}
    keys = list(matched)
    uncompressed_rows = [matched[k] for k in keys]
    for label, (out_u, out_c) in zip(labels, moved):
        du = _moved(rows_u, _rows(out_u[name]))[uncompressed_rows]
        dc = _moved(rows_c, _rows(out_c[name]))[keys]
        result["independent"][label] = int(np.sum(du <= SAME))
        for k, row, a, b in zip(keys, uncompressed_rows, du, dc):
            finding = {"row": k, "original_row": row, "perturbed": label, "uncompressed_change": float(a),
                       "compressed_change": float(b)}
            if a <= SAME and b > CHANGED:
                result["appeared"].append(finding)
            elif a > CHANGED and b <= SAME and not pooled:
                result["vanished"].append(finding)
    if result["appeared"] or result["vanished"]:
        result["status"] = FAILED
    elif pooled and not any(result["independent"].values()):
        return {"status": NOT_APPLICABLE, "why": "a pooled output (no token axis) depends on every perturbed token "
                "in the uncompressed model, so no dependence can appear: the check is vacuous for it"}
    return result


def format_lines(report: DependenceReport) -> list[str]:
    """Report lines for `tcexport validate`'s text output."""
    head = f"  dependence on perturbed tokens (batch {report.batch}; {', '.join(report.perturbations)}):"
    if not report.outputs:
        return [f"{head} {report.status.upper()}" + (f": {report.note}" if report.note else "")]
    lines = [head]
    for name, result in report.outputs.items():
        status = result["status"]
        if status == NOT_APPLICABLE:
            lines.append(f"    {name}: not applicable ({result['why']})")
            continue
        independent = ", ".join(f"{n}/{result['rows_checked']}" for n in result["independent"].values())
        lines.append(f"    {name}: {status}: {result['rows_checked']} rows checked (matched by {result['matched_by']}); "
                     f"independent of each perturbation before compression: {independent}")
        for kind, words in (("appeared", "now depends on"), ("vanished", "no longer depends on")):
            for finding in result[kind][:SHOWN]:
                lines.append(f"      row {finding['row']} (original row {finding['original_row']}) {words} "
                             f"{finding['perturbed']}: it changes by {finding['compressed_change']:.2e} of the "
                             f"output's scale, {finding['uncompressed_change']:.2e} before compression")
            if len(result[kind]) > SHOWN:
                lines.append(f"      ... and {len(result[kind]) - SHOWN} more rows where a dependence {kind}")
    return lines

