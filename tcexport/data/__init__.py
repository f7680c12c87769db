"""Small real-text samples for fidelity checks and demos (written for this project)."""

from importlib import resources


def sentences() -> list[str]:
    """Short everyday sentences, one per line."""
    return _lines("sentences.txt")


def paragraphs() -> list[str]:
    """Paragraphs long enough to fill a 128-token sequence."""
    text = resources.files(__package__).joinpath("paragraphs.txt").read_text(encoding="utf-8")
    return [p.strip().replace("\n", " ") for p in text.split("\n\n") if p.strip()]


def queries() -> list[str]:
    """One search query per paragraph, in the same order (for retrieval checks)."""
    return _lines("queries.txt")


def _lines(name: str) -> list[str]:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
