"""The result table: one row per comparison, rendered as markdown."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """ours / reference in seconds; `target` is the largest passing ratio.

    A row without a target only informs; one with `gate=False` shows its verdict in
    lower case, for targets that are aims rather than requirements.
    """

    case: str
    ours: float | None
    reference: float | None
    target: float | None = None
    notes: str = ""
    gate: bool = True

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        if self.target is None:
            return "info"
        verdict = "PASS" if self.ratio <= self.target else "FAIL"
        return verdict if self.gate else f"{verdict.lower()} (info)"


def seconds(t: float | None) -> str:
    if t is None:
        return "—"
    if t < 1:
        ms = t * 1000
        return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{t:.2f} s" if t < 100 else f"{t:.0f} s"


def render(rows: list[Row]) -> str:
    head = ["case", "ours", "reference", "ratio (ours/ref)", "target", "verdict", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r.case, seconds(r.ours), seconds(r.reference),
            "—" if r.ratio is None else (f"{r.ratio:.2f}" if r.ratio >= 0.01 else f"{r.ratio:.1e}"),
            "—" if r.target is None else f"≤ {r.target:g}",
            r.verdict, r.notes,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def emit(lines: list[str], out: "str | None") -> None:
    """Print the report, and also write it to `out` when given."""
    import sys
    from pathlib import Path

    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if out is not None:
        Path(out).write_text(report)
