"""One plan, measured: compressed in memory, its budget (FLOPs, tokens, latency) and its fidelity against the
uncompressed model on the calibration feeds, both run with ONNX Runtime on the same inputs.

Fidelity reuses tcexport.validate.fidelity's per-output comparison (validate --reference-onnx): the score is the mean
embedding cosine for feature outputs, and the mean of top-1 agreement and logit cosine for classifier outputs,
averaged over the outputs compression leaves comparable. `--metric py:module:fn` replaces it with
fn(reference_outputs, compressed_outputs) -> float (higher is better), both dicts of name -> array.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir

from tcexport.compress import plan as compress_plan
from tcexport.compress import rewrite as compress_mod
from tcexport.validate import fidelity
from tcexport.graph import flops
from tcexport.core.errors import UsageError
from tcexport.graph import attention, probe
from tcexport.graph import blocks as blocks_mod
from tcexport.tune.space import Structure

CHUNK = 16  # samples per ONNX Runtime run: bounds memory on large calibration sets

Metric = Callable[[dict, dict], float]


def load_metric(text: str | None) -> Metric | None:
    """--metric py:module:fn, imported from the current directory as py: model specs are."""
    if text is None:
        return None
    from tcexport.models import spec_check

    prefix, sep, target = str(text).partition(":")
    module_name, colon, name = target.partition(":")
    if prefix != "py" or not sep or not colon or not module_name or not name:
        raise UsageError(f"--metric must be py:module:function; got '{text}'")
    spec_check.import_from_cwd()
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--metric {text}: cannot import it ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise UsageError(f"--metric {text}: {name} is not a function")
    return fn


def session(model: onnx.ModelProto, threads: int | None = None):
    import onnxruntime as ort

    from tcexport.backends import ort as ort_backend

    return ort.InferenceSession(model.SerializeToString(), ort_backend.session_options(threads, model=model),
                                providers=["CPUExecutionProvider"])


def run_all(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs for every sample, run in chunks; only the inputs the session takes are fed."""
    names = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    n = next(iter(feeds.values())).shape[0]
    parts = []
    for begin in range(0, n, CHUNK):
        chunk = {k: feeds[k][begin:begin + CHUNK] for k in names}
        parts.append(sess.run(outputs, chunk))
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(outputs)}


def score(reference: dict, actual: dict, metric: Metric | None = None) -> tuple[float, dict]:
    """The objective and the per-output comparison it came from."""
    compared = {name: fidelity.compare_output(name, ref, np.asarray(actual[name])) for name, ref in reference.items()}
    if metric is not None:
        return float(metric(reference, actual)), compared
    values = []
    for o in compared.values():
        if "cosine_mean" not in o:
            continue
        values.append((o["top1_agreement"] + o["cosine_mean"]) / 2 if "top1_agreement" in o else o["cosine_mean"])
    if not values:
        raise UsageError("no output of the compressed model can be compared with the uncompressed one (compression "
                         "changes their shape); give --metric py:module:fn")
    return float(np.mean(values)), compared


class Evaluator:
    """The uncompressed model, its structure and outputs on the calibration feeds; plans are measured against it."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], metric: Metric | None = None,
                 threads: int | None = None, protected: int | None = None, reference: dict | None = None):
        self.model = attention.decompose_attention(model)
        self.shapes = probe.concrete_shapes(self.model)
        found = blocks_mod.find_blocks(ir.from_proto(self.model).graph, self.shapes)
        if not found:
            raise UsageError("the model has no attention blocks to compress")
        hidden = self.shapes[found[0].hidden.name]
        self.protected = compress_plan.default_protected(model) if protected is None else protected
        self.structure = Structure(len(found), int(hidden[1]), self.protected, int(hidden[-1]))
        self.metric, self.threads = metric, threads
        self.base_flops = measured_flops(self.model)
        self.feeds = feeds
        # Given: a Ray worker gets the driver's outputs, so every plan is scored against the same numbers.
        self.reference = run_all(session(self.model, threads), feeds) if reference is None else reference

    def compress(self, stages: list[str]) -> tuple[onnx.ModelProto, list[dict]]:
        planned = compress_plan.plan_stages(self.structure.depth, stages)
        names = list(dict.fromkeys(s.method.name for s in planned))
        plan = compress_plan.Plan("+".join(names), planned, self.protected, True, "subgraph", "constant",
                                 {"stages": list(stages)})
        return compress_mod.compress_model(self.model, plan, shapes=self.shapes)

    def flops_ratio(self, compressed: onnx.ModelProto) -> float:
        return measured_flops(compressed) / self.base_flops

    def fidelity(self, compressed: onnx.ModelProto, feeds: dict | None = None,
                 reference: dict | None = None) -> tuple[float, dict]:
        """Score on the search feeds, or on other feeds (held-out) with their uncompressed outputs."""
        actual = run_all(session(compressed, self.threads), self.feeds if feeds is None else feeds)
        return score(self.reference if reference is None else reference, actual, self.metric)


def measured_flops(model: onnx.ModelProto) -> int:
    """The model's FLOPs at batch 1 as every command counts them (flops.measure: every value's shape from one run
    of the graph); a model whose count cannot be derived cannot take a flops budget."""
    result = flops.measure(model, batch=1)
    if result.total is None:
        raise UsageError(f"cannot count the FLOPs of this model ({result.not_derived}); "
                         "use --budget tokens or latency for this model")
    return result.total


def token_ratio(schedule: list[dict], tokens: int) -> float:
    """The recorded schedule's mean over blocks of (in + out) / 2, over the uncompressed count."""
    return sum((s["in"] + s["out"]) / 2 for s in schedule) / (len(schedule) * tokens)
