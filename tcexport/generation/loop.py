"""The generation loop over a decoder graph: one prefill, then one step per new token, feeding each present back.

The loop knows the graph only by its I/O names (tcexport.export.decoder): every input whose name starts with
`past` is state, fed back from the output of the same name with `present` in its place; so layers may carry
caches of different lengths, and compressed graphs may carry extra state (a pruned layer group's key mask) without
the loop knowing what it is. The attention mask covers every position the prompt and generation put in the cache
(left padding is 0); position ids count real tokens only, so a left-padded row starts at position 0.

Cache policies act between steps on the state the graph returned (tcexport.generation.policies: StreamingLLM's
sink + window); the graph itself does the prefill compressions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from tcexport.core.errors import UsageError


class Runner(Protocol):
    """What the loop needs of an engine: its input names/types and one run."""

    def input_specs(self) -> dict[str, tuple[list, str]]: ...  # name -> (shape with symbolic dims, numpy dtype)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class Sampling:
    """Greedy when `temperature` is 0; otherwise softmax(logits / temperature) cut to the top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)

    def choose(self, logits: np.ndarray) -> np.ndarray:
        """One token per row of logits [batch, vocab]."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = []
        for row in probs:
            order = np.argsort(-row, kind="stable")
            cumulative = np.cumsum(row[order])
            keep = order[: int(np.searchsorted(cumulative, self.top_p) + 1)]
            chosen.append(self._rng.choice(keep, p=row[keep] / row[keep].sum()))
        return np.asarray(chosen)


@dataclass
class Generation:
    """What one generate call produced, per batch row, and how fast."""

    prompt_ids: list[list[int]]
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    ttft_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    kv_bytes: int = 0  # peak bytes of all state fed to the graph (the cache and any extra state)
    cache_lengths: dict[str, int] = field(default_factory=dict)  # per past input: its length after the last step
    first_logits: np.ndarray | None = None  # the prefill's last-position logits [batch, vocab]
    argmax: list[list[int]] = field(default_factory=list)  # per step, the top token (differs from tokens if forced)

    def to_json(self, text: list[str] | None = None) -> dict:
        data = {"prompt_ids": self.prompt_ids, "tokens": self.tokens, "logprobs": self.logprobs,
                "ttft_ms": round(self.ttft_ms, 3), "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "kv_bytes": self.kv_bytes, "cache_lengths": self.cache_lengths}
        if text is not None:
            data["text"] = text
        return data


def _is_ort_value(value) -> bool:
    return callable(getattr(value, "shape", None))  # OrtValue.shape() is a method; numpy's and torch's an attribute


def shape_of(value) -> tuple[int, ...]:
    """The shape of a state value: a numpy array, an onnxruntime OrtValue or a torch tensor (TensorRT's, on the
    GPU)."""
    return tuple(value.shape()) if _is_ort_value(value) else tuple(int(d) for d in value.shape)


def nbytes_of(value) -> int:
    if not _is_ort_value(value):
        return int(value.nbytes)
    size = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(int64)": 8, "tensor(int32)": 4}.get(value.data_type(), 4)
    return int(np.prod(value.shape())) * size


def as_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if _is_ort_value(value):
        return value.numpy()
    return value.detach().float().cpu().numpy() if str(value.dtype) == "torch.bfloat16" else value.detach().cpu().numpy()


def present_name(past: str) -> str:
    """past_key_values.3.key -> present.3.key; past_X -> present_X."""
    if past.startswith("past_key_values."):
        return "present." + past[len("past_key_values."):]
    return "present" + past[len("past"):]


def is_state(name: str) -> bool:
    return name.startswith("past")


def empty_state(specs: dict[str, tuple[list, str]], batch: int) -> dict[str, np.ndarray]:
    """Every state input at length 0: the batch axis is `batch`, other symbolic axes 0, static axes as declared."""
    state = {}
    for name, (shape, dtype) in specs.items():
        if not is_state(name):
            continue
        dims = [batch if i == 0 else (d if isinstance(d, int) and d >= 0 else 0) for i, d in enumerate(shape)]
        state[name] = np.zeros(dims, dtype=dtype)
    return state


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids [batch, longest] padded on the left, and the mask that marks real tokens."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    return ids, mask


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


StatePolicy = Callable[[dict[str, np.ndarray], np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]


def generate(runner: Runner, prompts: list[list[int]], max_new_tokens: int, eos_ids: tuple[int, ...] = (),
             pad_id: int = 0, sampling: Sampling | None = None, policy: StatePolicy | None = None,
             on_token: Callable[[int, list[int]], None] | None = None,
             forced: list[list[int]] | None = None,
             embed: Callable[[np.ndarray], np.ndarray] | None = None) -> Generation:
    """Generate up to `max_new_tokens` per prompt (all rows stop when every row has met an EOS).

    `forced`: per row, the tokens to feed instead of the chosen ones (teacher forcing, for scoring a given
    continuation: `logprobs` are then those of the forced tokens, `argmax` what the model would have chosen).

    `policy(state, mask) -> (state, mask)` runs after each step (a cache eviction rule); `on_token(row, tokens)`
    is called as tokens arrive (streaming). `embed(ids) -> inputs_embeds` feeds a graph that takes inputs_embeds
    (its embedding graph, or the model's embedding table)."""
    sampling = sampling or Sampling()
    specs = runner.input_specs()
    if "inputs_embeds" in specs and embed is None:
        raise UsageError("this decoder graph takes inputs_embeds: pass embed= (ids -> embeddings) to the loop")
    ids, mask = left_pad(prompts, pad_id)
    batch = ids.shape[0]
    state = empty_state(specs, batch)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    result = Generation([list(p) for p in prompts], [[] for _ in prompts], [[] for _ in prompts])
    result.argmax = [[] for _ in prompts]
    if forced is not None:
        max_new_tokens = min(max_new_tokens, min(len(f) for f in forced))
        eos_ids = ()
    finished = np.zeros(batch, dtype=bool)
    decode_seconds, decode_steps = 0.0, 0
    step_input = ids
    for step in range(max_new_tokens):
        tokens = {"inputs_embeds": embed(step_input)} if "inputs_embeds" in specs else {"input_ids": step_input}
        feeds = {**tokens, "attention_mask": mask, "position_ids": positions, **state}
        result.kv_bytes = max(result.kv_bytes, sum(nbytes_of(v) for v in state.values()))
        start = time.perf_counter()
        outputs = runner.run({k: v for k, v in feeds.items() if k in specs})
        logits = outputs["logits"][:, -1, :]
        chosen = sampling.choose(logits)
        if forced is not None:
            top = logits.argmax(-1)
            for row in range(batch):
                result.argmax[row].append(int(top[row]))
            chosen = np.asarray([f[step] for f in forced])
        elapsed = time.perf_counter() - start
        if step == 0:
            result.ttft_ms = elapsed * 1000
            result.first_logits = logits.copy()
        else:
            decode_seconds += elapsed
            decode_steps += 1
        logprobs = log_softmax(logits)
        for row in range(batch):
            if finished[row]:
                continue
            token = int(chosen[row])
            result.tokens[row].append(token)
            result.logprobs[row].append(float(logprobs[row, token]))
            if on_token is not None:
                on_token(row, result.tokens[row])
            if token in eos_ids:
                finished[row] = True
        state = {name: outputs[present_name(name)] for name in state}
        if finished.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        positions = positions[:, -1:] + 1
        step_input = np.where(finished, pad_id, chosen).astype(np.int64)[:, None]
        if policy is not None:
            state, mask = policy(state, mask)
    result.kv_bytes = max(result.kv_bytes, sum(nbytes_of(v) for v in state.values()))
    result.cache_lengths = {name: int(shape_of(value)[2] if len(shape_of(value)) == 4 else shape_of(value)[-1])
                            for name, value in state.items()}
    result.decode_tokens_per_s = decode_steps / decode_seconds if decode_seconds else 0.0  # per sequence
    return result
