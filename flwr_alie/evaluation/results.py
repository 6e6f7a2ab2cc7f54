"""The results of an evaluation: the tidy rows, a markdown table and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flwr_alie.evaluation.strategies import STRATEGIES

__all__ = [
    "attack_label",
    "final_accuracy_table",
    "plot_accuracy",
    "plot_heatmap",
    "read_rows",
]

Row = dict[str, Any]


def read_rows(path: Path) -> list[Row]:
    """Read the JSON-lines results file: one row per cell and round."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def attack_label(row: Row) -> str:
    """Return how the table names the attack of a row."""
    if row["fraction"] == 0:
        return "no attack"
    label = f"f={row['fraction']:g} z={row['z']}"
    if row["direction"] != "negative":
        label += f" {row['direction']}"
    if row["knowledge"] != "oracle":
        label += f" {row['knowledge']}"
    return label


def _group(rows: Iterable[Row]) -> dict[tuple[str, str, str], list[Row]]:
    """Rows by (strategy, split, attack), keeping each cell's last round."""
    last: dict[str, Row] = {}
    for row in rows:
        key = row["cell"]
        if (
            row.get("round") is None
            or key not in last
            or row["round"] > last[key]["round"]
        ):
            last[key] = row
    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for row in last.values():
        groups[(row["strategy"], row["split"], attack_label(row))].append(row)
    return groups


def _strategies(rows: Sequence[Row]) -> list[str]:
    """Strategies in the order of :data:`STRATEGIES` (others after, by name)."""
    names = {row["strategy"] for row in rows}
    known = [name for name in STRATEGIES if name in names]
    return known + sorted(names - set(known))


def _columns(rows: Sequence[Row]) -> list[str]:
    seen: dict[str, tuple[float, str]] = {}
    for row in rows:
        seen.setdefault(attack_label(row), (row["fraction"], str(row["z"])))
    return sorted(seen, key=lambda c: (c != "no attack", seen[c]))


def final_accuracy_table(rows: Sequence[Row]) -> str:
    """Markdown table of final test accuracy: strategy (and split) x attack.

    Each attacked cell shows the accuracy after the last round (mean over seeds,
    with the standard deviation when there are several) and, in parentheses, the
    change from the no-attack cell of the same strategy and split. A configuration
    that cannot run shows ``invalid`` with its reason below the table; a cell that
    failed shows ``error``.
    """
    groups = _group(rows)
    columns = _columns(rows)
    splits = sorted({row["split"] for row in rows})
    strategies = _strategies(rows)
    header = ["strategy", *(["split"] if len(splits) > 1 else []), *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: list[str] = []
    for strategy in strategies:
        for split in splits:
            reference = _mean_accuracy(groups.get((strategy, split, "no attack"), []))
            cells = []
            for column in columns:
                group = groups.get((strategy, split, column), [])
                cells.append(_format_cell(group, column, reference, notes))
            label = [strategy, *([split] if len(splits) > 1 else [])]
            lines.append("| " + " | ".join(label + cells) + " |")
    if notes:
        lines.append("")
        lines.extend(f"{i + 1}. {note}" for i, note in enumerate(notes))
    return "\n".join(lines)


def _mean_accuracy(group: Sequence[Row]) -> float | None:
    values = [row["accuracy"] for row in group if row.get("status") == "ok"]
    return statistics.fmean(values) if values else None


def _format_cell(
    group: Sequence[Row], column: str, reference: float | None, notes: list[str]
) -> str:
    if not group:
        return ""
    bad = [row for row in group if row.get("status") != "ok"]
    if bad:
        notes.append(f"{bad[0]['strategy']}, {column}: {bad[0].get('reason', '')}")
        return f"{bad[0]['status']} ({len(notes)})"
    values = [row["accuracy"] for row in group]
    mean = statistics.fmean(values)
    text = f"{mean:.3f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.3f}"
    if reference is not None and column != "no attack":
        text += f" ({mean - reference:+.3f})"
    return text


def plot_accuracy(rows: Sequence[Row], path: Path) -> None:
    """Plot test accuracy per round: a line per strategy, a panel per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row.get("status") == "ok"]
    columns = _columns(ok)
    splits = sorted({row["split"] for row in ok})
    fig, axes = plt.subplots(
        len(splits),
        len(columns),
        figsize=(4.2 * len(columns), 3.3 * len(splits)),
        sharey=True,
        squeeze=False,
    )
    for split, panels in zip(splits, axes, strict=True):
        for ax, column in zip(panels, columns, strict=True):
            for strategy in _strategies(ok):
                curve: dict[int, list[float]] = defaultdict(list)
                for row in ok:
                    if (row["strategy"], row["split"], attack_label(row)) == (
                        strategy,
                        split,
                        column,
                    ):
                        curve[row["round"]].append(row["accuracy"])
                rounds = sorted(curve)
                means = [statistics.fmean(curve[r]) for r in rounds]
                ax.plot(rounds, means, label=strategy)
            ax.set_title(column if len(splits) == 1 else f"{split}: {column}")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        panels[0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(rows: Sequence[Row], path: Path) -> None:
    """Plot final accuracy as a heatmap: strategies (x splits) x attacks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = _group(rows)
    columns = _columns(rows)
    splits = sorted({row["split"] for row in rows})
    labels = [(strategy, split) for split in splits for strategy in _strategies(rows)]
    values = np.full((len(labels), len(columns)), np.nan)
    for i, (strategy, split) in enumerate(labels):
        for j, column in enumerate(columns):
            mean = _mean_accuracy(groups.get((strategy, split, column), []))
            values[i, j] = math.nan if mean is None else mean
    fig, ax = plt.subplots(figsize=(1.9 * len(columns) + 2.8, 0.5 * len(labels) + 1.5))
    ax.set_facecolor("#dddddd")
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(len(labels)):
        for j in range(len(columns)):
            text = "invalid" if math.isnan(values[i, j]) else f"{values[i, j]:.2f}"
            color = "black" if values[i, j] > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    names = [s if len(splits) == 1 else f"{s} ({split})" for s, split in labels]
    ax.set_yticks(range(len(labels)), names)
    fig.colorbar(image, ax=ax, label="final test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
