"""Optimization-profile shapes and memory for TensorRT builds.

Plain functions, testable without TensorRT: the --batch MIN,OPT,MAX range (parse_batch_range), the min/opt/max
shape of every input, where only a dynamic batch axis varies (profile_shapes, ProfileShape), and the --workspace
memory pool size (workspace_bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tcexport.core.errors import UsageError
from tcexport.models import inputs

DEFAULT_DYNAMIC_BATCH = (1, 1, 8)


@dataclass(frozen=True)
class ProfileShape:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def parse_batch_range(text: str | None) -> tuple[int, int, int] | None:
    """'1,1,8' -> (1, 1, 8); '4' -> (4, 4, 4); None -> None (choose from the model)."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"--batch must be MIN,OPT,MAX (e.g. 1,1,8) or one size, got '{text}'") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(v < 1 for v in values) or not values[0] <= values[1] <= values[2]:
        raise UsageError(f"--batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got '{text}'")
    return values  # type: ignore[return-value]


def profile_shapes(specs: Iterable[inputs.InputSpec],
                   batch_min_opt_max: tuple[int, int, int] | None = None) -> dict[str, ProfileShape]:
    """Min/opt/max shape per input: only a dynamic batch axis (axis 0) varies, every other axis is fixed.

    A model exported with a fixed batch gets that batch for min/opt/max; asking for another range is an error.
    """
    specs = list(specs)
    if inputs.is_decoder_graph(specs):
        return decoder_profile_shapes(specs, batch_min_opt_max or DEFAULT_DYNAMIC_BATCH)
    static_batches = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    dynamic = any(s.shape and not (isinstance(s.shape[0], int) and s.shape[0] > 0) for s in specs)
    if batch_min_opt_max is None:
        if dynamic:
            batch_min_opt_max = DEFAULT_DYNAMIC_BATCH
        else:
            fixed = static_batches.pop() if len(static_batches) == 1 else 1
            batch_min_opt_max = (fixed, fixed, fixed)
    low, opt, high = batch_min_opt_max
    shapes = {}
    for spec in specs:
        if not spec.shape:
            shapes[spec.name] = ProfileShape((), (), ())
            continue
        first = spec.shape[0]
        if isinstance(first, int) and first > 0 and (low, opt, high) != (first, first, first):
            raise UsageError(f"input '{spec.name}' has a fixed batch of {first}, so the profile cannot be "
                             f"{low},{opt},{high}; pass --batch {first} or re-export with a dynamic batch")
        shapes[spec.name] = ProfileShape(spec.concrete_shape(low), spec.concrete_shape(opt), spec.concrete_shape(high))
    return shapes


DECODER_SEQ = (1, 128, 2048)  # prompt tokens per call: a decode step (1) to a long prefill
DECODER_PAST = (0, 512, 2048)  # cached positions: empty (the prefill) to a long context


def decoder_profile_shapes(specs: Iterable[inputs.InputSpec], batch: tuple[int, int, int],
                           seq: tuple[int, int, int] = DECODER_SEQ,
                           past: tuple[int, int, int] = DECODER_PAST) -> dict[str, ProfileShape]:
    """One profile for a decoder graph that serves the prefill and every decode step: the sequence axis of
    input_ids/position_ids spans `seq`, every cache's past axis (and pruned groups' position state) spans `past`,
    the attention mask spans their sum."""
    shapes = {}
    for spec in specs:
        def dims(k: int) -> tuple[int, ...]:
            out = []
            for axis, d in enumerate(spec.shape):
                if isinstance(d, int) and d > 0:
                    out.append(d)
                elif axis == 0:
                    out.append(batch[k])
                elif spec.name.startswith("past"):
                    out.append(past[k])
                elif spec.name == "attention_mask":
                    out.append(max(1, seq[k] + past[k]))
                else:
                    out.append(seq[k])
            return tuple(out)

        shapes[spec.name] = ProfileShape(dims(0), dims(1), dims(2))
    return shapes


def workspace_bytes(megabytes: int | None) -> int | None:
    """--workspace MB -> bytes for the WORKSPACE memory pool; None keeps TensorRT's default (all device memory)."""
    if megabytes is None:
        return None
    if int(megabytes) <= 0:
        raise UsageError(f"--workspace must be a positive number of MB, got {megabytes}")
    return int(megabytes) * (1 << 20)


__all__ = ["parse_batch_range", "profile_shapes", "workspace_bytes", "ProfileShape", "DEFAULT_DYNAMIC_BATCH"]
