"""The search: an optuna study over plan shapes, started from structured plans, each trial sized to the budget.

A trial: draw a shape (space.suggest; the first trials are space.structured_start's), solve its intensity on a
proxy of the budget, compress, measure the real budget (FLOPs of the rewritten graph, its recorded token
schedule, or its latency against the uncompressed model) and shrink the target until it is met (up to
FIT_TRIES times), then score its fidelity. Infeasible plans are told to optuna below every feasible one.
After the trials, the best shape's neighbours (one block earlier or later at either end, every block more or
less, the slope +-0.5) are tried too, while one of them beats it (POLISH_ROUNDS): TPE samples the space
broadly, and a plan one step from the best is often better and cheap to check (role "polish" in the records).
Ctrl-C ends the search; the trials done so far are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tcexport.core import progress
from tcexport.core.errors import UsageError
from tcexport.tune import objective, space
from tcexport.tune.budget import Budget

FIT_TRIES = 3
POLISH_ROUNDS = 2  # rounds of trying the best shape's neighbours after the search (each stops if none is better)
NEIGHBOUR_STEPS = (("start", -1), ("start", 1), ("stop", -1), ("stop", 1), ("every", -1), ("every", 1),
                   ("slope", -0.5), ("slope", 0.5))
SWEEP = (-0.15, -0.10, -0.05, 0.05, 0.10)  # budget offsets the best shape is also measured at (Pareto front)


@dataclass
class Result:
    records: list[dict] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def feasible(self) -> list[dict]:
        return [r for r in self.records if r.get("feasible") and r.get("fidelity") is not None]

    def best(self) -> dict | None:
        searched = [r for r in self.feasible() if r["role"] != "sweep"]
        return max(searched, key=lambda r: r["fidelity"], default=None)


class Sizer:
    """Shape -> plan meeting the budget: stages, compressed model, measured costs."""

    def __init__(self, evaluator: objective.Evaluator, budget: Budget, latency=None):
        self.evaluator, self.budget, self.latency = evaluator, budget, latency

    def measure(self, compressed, schedule) -> dict:
        costs = {"flops": self.evaluator.flops_ratio(compressed),
                 "tokens": objective.token_ratio(schedule, self.evaluator.structure.tokens)}
        if self.budget.kind == "latency":
            costs["latency"] = self.latency.ratio(compressed)
        return costs

    def fit(self, shape: space.Shape, ratio: float) -> dict:
        structure = self.evaluator.structure
        proxy = "tokens" if self.budget.kind == "tokens" else "flops"
        target, record = ratio, {}
        for _ in range(FIT_TRIES):
            intensity, sized = space.solve(shape, structure, target, proxy)
            if not sized.stages:
                return {"stages": [], "feasible": False, "note": "the shape removes no token"}
            compressed, schedule = self.evaluator.compress(sized.stages)
            costs = self.measure(compressed, schedule)
            measured = costs[self.budget.kind]
            record = {"stages": sized.stages, "intensity": round(intensity, 4), "costs": costs, "cost": measured,
                      "tokens": [schedule[0]["in"]] + [s["out"] for s in schedule],
                      "feasible": measured <= ratio + 1e-9, "_model": compressed}
            if record["feasible"] or intensity >= 1.0:
                break
            target *= ratio / measured * 0.995  # the proxy was optimistic: aim lower by what it missed
        return record


def _tell_value(record: dict) -> float:
    if record.get("fidelity") is None:
        return -2.0
    return record["fidelity"] if record["feasible"] else record["fidelity"] - 1.0


def run(evaluator: objective.Evaluator, budget: Budget, names: tuple[str, ...], trials: int | None,
        time_limit: float | None, seed: int = 0, latency=None, remote=None, sweep: bool = True) -> Result:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    structure = evaluator.structure
    seeds = space.structured_start(names, structure)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(len(seeds), 4))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for params in seeds:
        study.enqueue_trial(params, skip_if_exists=True)
    n_start = len(study.trials)  # the enqueued ones (a shallow model's seeds can coincide)
    sizer = Sizer(evaluator, budget, latency)
    result, started = Result(), time.perf_counter()
    seen: dict[tuple, dict] = {}
    width = remote.parallel if remote is not None else 1
    try:
        while not _done(result, trials, time_limit, started):
            count = width if trials is None else min(width, trials - _searched(result))
            batch = [study.ask() for _ in range(count)]
            pending = []
            for trial in batch:
                shape = space.suggest(trial, names, structure)
                record = {"number": trial.number, "role": "start" if trial.number < n_start else "search",
                          "shape": shape.to_json(), "describe": shape.describe()}
                key = shape.key()
                pending.append((trial, record, time.perf_counter(), key))
                if key in seen:  # TPE may draw a shape again: the same plan, measured once
                    record.update(seen[key], repeat=True)
                    continue
                try:
                    record.update(sizer.fit(shape, budget.ratio))
                except UsageError as exc:  # a plan the method refuses at some block
                    record.update(feasible=False, note=str(exc))
            _score(evaluator, [r for _, r, _, _ in pending], remote)
            for trial, record, t0, key in pending:
                record["seconds"] = round(time.perf_counter() - t0, 3)
                record.pop("_model", None)  # a compressed model is large; keep only what was measured
                seen.setdefault(key, {k: v for k, v in record.items() if k not in _PER_TRIAL})
                study.tell(trial, _tell_value(record))
                _finish(result, record, trials, budget)
        if time_limit is None or time.perf_counter() - started < time_limit:
            _polish(evaluator, sizer, result, budget, remote, seen)
        if sweep and result.best() is not None:
            _sweep(evaluator, sizer, result, budget, remote)
    except KeyboardInterrupt:
        result.interrupted = True
    result.seconds = round(time.perf_counter() - started, 3)
    for record in result.records:
        record.pop("_model", None)  # left by a trial Ctrl-C cut short
    return result


_PER_TRIAL = ("number", "role", "shape", "describe", "seconds", "repeat")


def _score(evaluator, records: list[dict], remote) -> None:
    """Fidelity of every plan that has stages: in-process, or as Ray tasks in parallel."""
    todo = [r for r in records if r.get("stages") and "_model" in r]
    if remote is not None:
        scores = remote.fidelity([r["stages"] for r in todo])
    else:
        scores = [evaluator.fidelity(r["_model"]) for r in todo]
    for record, (value, compared) in zip(todo, scores):
        record["fidelity"], record["outputs"] = value, compared


def _searched(result: Result) -> int:
    return sum(1 for r in result.records if r["role"] in ("start", "search"))


def _shape_of(record: dict, structure) -> space.Shape:
    """The Shape a trial record was drawn as (records keep it as JSON)."""
    return space.shape_from_params({**record["shape"], "method": "+".join(record["shape"]["methods"])}, structure)


def neighbours(shape: space.Shape, structure) -> list[space.Shape]:
    """Shapes one step from `shape`: each of NEIGHBOUR_STEPS that stays a valid shape."""
    last = structure.depth - 1
    found = []
    for name, step in NEIGHBOUR_STEPS:
        params = {**shape.to_json(), "method": "+".join(shape.methods)}
        params[name] = max(-1.0, min(1.0, params[name] + step)) if name == "slope" else params[name] + step
        if not (0 <= params["start"] <= params["stop"] <= last and params["every"] >= 1):
            continue
        candidate = space.shape_from_params(params, structure)
        if candidate.key() != shape.key():
            found.append(candidate)
    return found


def _polish(evaluator, sizer: Sizer, result: Result, budget: Budget, remote, seen: dict) -> None:
    """Try the best shape's unseen neighbours; repeat from a better one, up to POLISH_ROUNDS times."""
    for _ in range(POLISH_ROUNDS):
        best = result.best()
        if best is None:
            return
        shape = _shape_of(best, evaluator.structure)
        records, fit_seconds = [], []
        for candidate in neighbours(shape, evaluator.structure):
            if candidate.key() in seen:
                continue
            record = {"number": None, "role": "polish", "shape": candidate.to_json(), "describe": candidate.describe()}
            started = time.perf_counter()
            try:
                record.update(sizer.fit(candidate, budget.ratio))
            except UsageError as exc:
                record.update(feasible=False, note=str(exc))
            fit_seconds.append(time.perf_counter() - started)
            seen[candidate.key()] = {k: v for k, v in record.items() if k not in (*_PER_TRIAL, "_model")}
            records.append(record)
        scoring = time.perf_counter()
        _score(evaluator, records, remote)
        share = (time.perf_counter() - scoring) / max(1, len(records))  # scored together (Ray: in parallel)
        for record, seconds in zip(records, fit_seconds):
            record["seconds"] = round(seconds + share, 3)
            record.pop("_model", None)
            _finish(result, record, None, budget)
        if result.best() is best:
            return


def _done(result: Result, trials: int | None, time_limit: float | None, started: float) -> bool:
    if trials is not None and _searched(result) >= trials:
        return True
    return time_limit is not None and time.perf_counter() - started >= time_limit


def _finish(result: Result, record: dict, trials: int | None, budget: Budget) -> None:
    result.records.append(record)
    best = result.best()
    total = f"/{trials}" if trials else ""
    label = f"trial {_searched(result)}{total}" if record["role"] in ("start", "search") else record["role"]
    with progress.step(f"{label} {record['describe']}") as item:
        item.start -= record.get("seconds", 0.0)  # the line reports the trial's own time, measured before
        if record.get("fidelity") is not None:
            item.note(f"fidelity {record['fidelity']:.4f}, {budget.kind} {record['cost']:.3f}"
                      f"{'' if record['feasible'] else ' (over budget)'}")
        else:
            item.note(record.get("note", "not scored"))
        item.note(f"best {best['fidelity']:.4f}" if best else "no plan meets the budget yet")


def _sweep(evaluator, sizer: Sizer, result: Result, budget: Budget, remote) -> None:
    """The best shape at other budgets: the Pareto front around the chosen point."""
    best = result.best()
    shape = _shape_of(best, evaluator.structure)
    records = []
    for offset in SWEEP:
        ratio = round(budget.ratio + offset, 4)
        if not 0.02 < ratio < 1:
            continue
        record = {"number": None, "role": "sweep", "shape": best["shape"], "describe": best["describe"],
                  "ratio": ratio}
        try:
            record.update(sizer.fit(shape, ratio))
        except UsageError as exc:
            record.update(feasible=False, note=str(exc))
        records.append(record)
    _score(evaluator, records, remote)
    for record in records:
        record.pop("_model", None)
        record["feasible"] = record.get("cost") is not None and record["cost"] <= budget.ratio + 1e-9
        result.records.append(record)
