"""The budget a tuned plan must meet: a ratio of the uncompressed model's FLOPs, tokens or latency."""

from __future__ import annotations

from dataclasses import dataclass

from tcexport.core.errors import UsageError

KINDS = ("flops", "tokens", "latency")


@dataclass(frozen=True)
class Budget:
    kind: str  # flops, tokens or latency
    ratio: float  # the compressed model may cost at most this fraction of the uncompressed one

    def met(self, measured: float) -> bool:
        return measured <= self.ratio + 1e-9

    def text(self) -> str:
        return f"{self.kind}={self.ratio:g}"


def parse(text: str) -> Budget:
    """'flops=0.75' (at most 75 % of the uncompressed FLOPs, i.e. 25 % fewer), 'tokens=0.6', 'latency=0.7'."""
    kind, eq, value = str(text).partition("=")
    kind = kind.strip().lower()
    if not eq or kind not in KINDS:
        raise UsageError(f"--budget must be KIND=RATIO with KIND one of {', '.join(KINDS)} (e.g. flops=0.75); "
                         f"got '{text}'")
    try:
        ratio = float(value)
    except ValueError:
        raise UsageError(f"--budget {kind}= takes a number between 0 and 1 (e.g. {kind}=0.75); got '{value}'") from None
    if not 0 < ratio < 1:
        raise UsageError(f"--budget {kind}={value}: the ratio must be above 0 and below 1 (the fraction of the "
                         "uncompressed model's cost the plan may keep)")
    return Budget(kind, ratio)
