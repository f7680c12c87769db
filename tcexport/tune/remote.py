"""--ray ADDRESS|auto: fidelity trials as Ray tasks. The uncompressed model, the calibration feeds and their
uncompressed outputs go into the object store once; a task gets the plan's stages, compresses and scores it
with the same code as in-process (objective.Evaluator), and each worker builds its evaluator once.

`auto` joins a running cluster when there is one, else starts Ray on this machine (LOCAL_WORKERS CPUs).
Latency is never measured here: it stays on the local backend, one plan at a time (tune/latency.py).
"""

from __future__ import annotations

import hashlib
import logging

from tcexport.core.errors import UsageError

LOCAL_WORKERS = 2
QUIET = {"log_to_driver": False, "logging_level": logging.WARNING}  # stderr stays tcexport's progress lines
_EVALUATORS: dict[str, object] = {}  # per worker process: model digest -> Evaluator


def require_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, which is not installed; pip install 'tcexport[ray]'") from None
    return ray


def _evaluate(digest: str, model_bytes: bytes, feeds: dict, reference: dict, metric: str | None,
              protected: int, threads: int | None, stages: list[str]):
    import onnx

    from tcexport.tune import objective

    evaluator = _EVALUATORS.get(digest)
    if evaluator is None:
        evaluator = objective.Evaluator(onnx.load_from_string(model_bytes), feeds, objective.load_metric(metric),
                                        threads, protected, reference=reference)
        _EVALUATORS[digest] = evaluator
    compressed, _ = evaluator.compress(stages)
    return evaluator.fidelity(compressed)


class RayPool:
    def __init__(self, address: str, evaluator, metric: str | None, threads: int | None = 1):
        ray = require_ray()
        self.ray = ray
        if not ray.is_initialized():
            try:
                if address == "auto":
                    try:
                        ray.init(address="auto", **QUIET)
                    except ConnectionError:
                        ray.init(num_cpus=LOCAL_WORKERS, include_dashboard=False, **QUIET)
                else:
                    ray.init(address=address, **QUIET)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise UsageError(f"--ray {address}: cannot reach a Ray cluster ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        data = evaluator.model.SerializeToString()
        self.args = [hashlib.sha256(data).hexdigest(), ray.put(data), ray.put(evaluator.feeds),
                     ray.put(evaluator.reference), metric, evaluator.protected, threads]
        self.task = ray.remote(num_cpus=1)(_evaluate)
        self.parallel = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def fidelity(self, stage_lists: list[list[str]]) -> list[tuple[float, dict]]:
        futures = [self.task.remote(*self.args, stages) for stages in stage_lists]
        try:
            return self.ray.get(futures)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UsageError):
                raise cause from None
            raise

    def close(self) -> None:
        self.ray.shutdown()
