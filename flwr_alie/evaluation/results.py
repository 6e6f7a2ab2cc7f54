"""The results of an evaluation: rows, the paired table and the plots.

``results.jsonl`` holds one row per cell, seed and round (plus one row for a cell
that could not run). Everything else is computed from it: a cell's *metric* is its
mean test accuracy over the last rounds, and every comparison pairs two cells of
the same seed (:mod:`flwr_alie.evaluation.stats`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr_alie.evaluation.stats import Interval, mean_interval, paired_difference
from flwr_alie.evaluation.strategies import STRATEGIES
from flwr_alie.evaluation.wire import (
    ROW_ACCURACY,
    ROW_CELL,
    ROW_ROUND,
    ROW_STATUS,
    STATUS_INVALID,
    STATUS_OK,
)

__all__ = [
    "Summary",
    "is_finished",
    "paired_table",
    "plateau_checks",
    "plot_accuracy",
    "plot_effect",
    "read_rows",
    "unfinished",
]

Row = dict[str, Any]
# (strategy, split, f) names a table row; the attack label a column
RowKey = tuple[str, str, int]


def read_rows(path: Path) -> list[Row]:
    """Read a results file; a line cut short by an interrupt is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _order(name: str) -> tuple[int, str]:
    return (STRATEGIES.index(name) if name in STRATEGIES else len(STRATEGIES), name)


class Summary:
    """Per-cell metrics by seed, and how cells pair up, from the rows of a run.

    Parameters
    ----------
    rows : Sequence[Row]
        The rows of ``results.jsonl``.
    last : int
        How many final rounds a cell's metric averages.
    """

    def __init__(self, rows: Sequence[Row], last: int) -> None:
        self.last = last
        # cell key without the seed -> seed -> metric
        self.metric: dict[str, dict[int, float]] = defaultdict(dict)
        self.curves: dict[str, dict[int, dict[int, float]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        self.failed: dict[str, str] = {}  # setting -> status and reason
        self.info: dict[str, Row] = {}
        per_cell: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
        for row in rows:
            setting = _setting(row)
            self.info.setdefault(setting, row)
            if row.get(ROW_STATUS) != STATUS_OK:
                reason = f"{row.get('status')}: {row.get('reason', '')}"
                self.failed.setdefault(setting, reason)
                continue
            per_cell[(setting, row["seed"])][row[ROW_ROUND]] = row[ROW_ACCURACY]
            self.curves[setting][row["seed"]][row[ROW_ROUND]] = row[ROW_ACCURACY]
        for (setting, seed), by_round in per_cell.items():
            rounds = int(self.info[setting]["rounds"])
            wanted = range(max(1, rounds - last + 1), rounds + 1)
            if all(r in by_round for r in wanted):  # a finished cell only
                self.metric[setting][seed] = sum(by_round[r] for r in wanted) / len(
                    wanted
                )

    def rows_and_columns(self) -> tuple[list[RowKey], list[str]]:
        """Return the table's rows (strategy, split, f) and attack columns."""
        rows: set[RowKey] = set()
        columns: dict[str, tuple[int, float, str, str]] = {}
        for row in self.info.values():
            if row["attack"] != "clean":
                rows.add((row["strategy"], row["split"], row["num_byzantine"]))
                z = row["z"]
                numeric = (0, float(z)) if isinstance(z, int | float) else (1, 0.0)
                columns[row["attack"]] = (*numeric, row["direction"], row["knowledge"])
        ordered = sorted(rows, key=lambda r: (_order(r[0]), r[1], r[2]))
        return ordered, sorted(columns, key=lambda c: columns[c])

    def find(self, key: RowKey, attack: str) -> str | None:
        """Return the setting of a table row's cell (``clean``: its reference)."""
        strategy, split, _ = key
        attacked = [
            s
            for s, row in self.info.items()
            if (row["strategy"], row["split"], row["num_byzantine"]) == key
            and row["attack"] != "clean"
        ]
        if attack != "clean":
            return next((s for s in attacked if self.info[s]["attack"] == attack), None)
        declared = {self.info[s]["declared"] for s in attacked}
        return next(
            (
                s
                for s, row in self.info.items()
                if row["attack"] == "clean"
                and (row["strategy"], row["split"]) == (strategy, split)
                and row["declared"] in declared
            ),
            None,
        )

    def fedavg(self, split: str) -> str | None:
        """Return the setting of clean FedAvg on `split`."""
        return next(
            (
                s
                for s, row in self.info.items()
                if row["attack"] == "clean"
                and row["strategy"] == "fedavg"
                and row["split"] == split
            ),
            None,
        )

    def accuracy(self, setting: str | None) -> Interval | None:
        """Return the cell's metric across seeds, with its interval."""
        if setting is None or not self.metric.get(setting):
            return None
        return mean_interval(list(self.metric[setting].values()))

    def difference(self, a: str | None, b: str | None) -> Interval | None:
        """Paired ``a - b`` across the seeds both finished."""
        if a is None or b is None:
            return None
        ma, mb = self.metric.get(a, {}), self.metric.get(b, {})
        if not set(ma) & set(mb):
            return None
        return paired_difference(ma, mb)


def _setting(row: Row) -> str:
    """Return a cell's key without its seed: what seeds are paired over."""
    return str(row[ROW_CELL]).rsplit("/seed", 1)[0]


def _acc(interval: Interval | None) -> str:
    if interval is None:
        return ""
    if interval.half_width is None:
        return f"{interval.mean:.3f}"
    return f"{interval.mean:.3f} ± {interval.half_width:.3f}"


def _diff(interval: Interval | None) -> str:
    if interval is None:
        return ""
    text = f"{interval.mean:+.3f}"
    if interval.low is not None and interval.high is not None:
        text += f" [{interval.low:+.3f}, {interval.high:+.3f}]"
    return text + (" *" if interval.significant else "")


def paired_table(rows: Sequence[Row], *, last: int) -> str:
    """Return the markdown table of a run: references, costs, effects.

    Per strategy, split and ``f``: the clean reference, the defence's cost, and for
    each attack the accuracy under attack and its effect.

    - *clean*: the strategy configured for ``f`` Byzantine nodes, all clients
      honest; mean accuracy over the last `last` rounds, ± the half-width of its
      95% interval across seeds.
    - *cost vs FedAvg*: clean strategy minus clean FedAvg, paired by seed.
    - *<attack>*: accuracy with ``f`` clients running ALIE.
    - *effect*: attacked minus clean, paired by seed, ``[95% interval]``, and
      ``*`` where the interval excludes 0.
    """
    summary = Summary(rows, last)
    keys, columns = summary.rows_and_columns()
    f_label = _f_labeller(rows)
    header = ["strategy", "split", "f", "clean", "cost vs FedAvg"]
    for column in columns:
        header += [column, f"effect of {column}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: list[str] = []

    def mark(setting: str | None, f: int) -> str | None:
        if setting is None or setting not in summary.failed:
            return None
        row = summary.info[setting]
        notes.append(
            f"{row['strategy']} ({row['split']}, {row['attack']}, "
            f"f={f}/{row['clients']}): {summary.failed[setting]}"
        )
        return f"{summary.failed[setting].split(':')[0]} ({len(notes)})"

    for key in keys:
        strategy, split, f = key
        clean = summary.find(key, "clean")
        cells = [
            strategy,
            split,
            f_label(f),
            mark(clean, f) or _acc(summary.accuracy(clean)),
            _diff(summary.difference(clean, summary.fedavg(split)))
            if strategy != "fedavg"
            else "",
        ]
        for column in columns:
            attacked = summary.find(key, column)
            failed = mark(attacked, f)
            cells += [
                failed or _acc(summary.accuracy(attacked)),
                "" if failed else _diff(summary.difference(attacked, clean)),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines.extend(f"{i + 1}. {note}" for i, note in enumerate(notes))
    checks = plateau_checks(summary)
    if checks:
        lines.append("")
        lines.extend(checks)
    return "\n".join(lines)


def attack_contrasts(rows: Sequence[Row], *, last: int) -> str:
    """Return a table comparing attacks that differ in one option, paired by seed.

    Per strategy, split and ``f``, for two attacked cells alike but for one option:
    ``byzantine-only`` minus ``oracle`` (is the paper's threat model as strong as
    the oracle?) and one ``z`` minus another (``max``, the round's ``z_max``, minus a
    number; a larger number minus a smaller). Negative: the first attack hurts
    more. Empty when the run has no such pair.
    """
    summary = Summary(rows, last)
    keys, columns = summary.rows_and_columns()
    f_label = _f_labeller(rows)
    lines: list[str] = []
    for key in keys:
        strategy, split, f = key
        found = {c: summary.find(key, c) for c in columns}
        settings = {
            c: s for c, s in found.items() if s is not None and s not in summary.failed
        }
        for a, b in itertools.permutations(settings, 2):
            ra, rb = summary.info[settings[a]], summary.info[settings[b]]
            differ = [k for k in ("z", "direction", "knowledge") if ra[k] != rb[k]]
            if differ == ["knowledge"] and ra["knowledge"] == "byzantine-only":
                label = f"byzantine-only - oracle (z={ra['z']})"
            elif differ == ["z"] and _z_rank(ra["z"]) > _z_rank(rb["z"]):
                label = f"z={ra['z']} - z={rb['z']} ({ra['knowledge']})"
            else:
                continue
            difference = summary.difference(settings[a], settings[b])
            lines.append(
                f"| {strategy} | {split} | {f_label(f)} | {label} | "
                f"{_diff(difference)} |"
            )
    if not lines:
        return ""
    header = "| strategy | split | f | attack minus attack | paired difference |"
    return "\n".join([header, "|---|---|---|---|---|", *lines])


def _f_labeller(rows: Sequence[Row]) -> Callable[[int], str]:
    """Return what writes ``f`` as ``f/n`` when every row has the same ``n``."""
    clients = {row["clients"] for row in rows}
    n = next(iter(clients)) if len(clients) == 1 else None
    return lambda f: str(f) if n is None else f"{f}/{n}"


def _z_rank(z: object) -> float:
    return math.inf if z == "max" else float(z)  # type: ignore[arg-type]


def plateau_checks(summary: Summary) -> list[str]:
    """Say whether clean FedAvg has stopped learning by the end of the run.

    Per split: clean FedAvg's mean accuracy over the last ``last`` rounds minus its
    mean over the ``last`` rounds before, paired by seed. An interval that holds 0
    (or a small change) says the metric measures where training ends, not how fast
    it gets there.
    """
    lines = []
    for setting, curves in sorted(summary.curves.items()):
        row = summary.info[setting]
        if row["strategy"] != "fedavg" or row["attack"] != "clean":
            continue
        rounds, last = int(row["rounds"]), summary.last
        if rounds < 2 * last:
            continue
        window = range(rounds - last + 1, rounds + 1)
        before = range(rounds - 2 * last + 1, rounds - last + 1)
        gain = {}
        for seed, curve in curves.items():
            if all(r in curve for r in (*window, *before)):
                late = sum(curve[r] for r in window) / last
                gain[seed] = late - sum(curve[r] for r in before) / last
        if gain:
            interval = mean_interval(list(gain.values()))
            lines.append(
                f"Plateau check ({row['split']}): clean FedAvg's rounds "
                f"{window.start}-{window.stop - 1} minus rounds {before.start}-"
                f"{before.stop - 1}: {_diff(interval)}"
            )
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nothing_to_plot(plt: Any, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, "no attacked cell in these results", ha="center", va="center")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(rows: Sequence[Row], path: Path, *, last: int) -> None:
    """Plot test accuracy per round: a panel per strategy and split, a line per attack.

    Each panel holds one strategy's clean reference (black) and its attacked cells,
    each line the mean across seeds with its 95% band: an attack's effect is the
    gap between a coloured line and the black one. The last `last` rounds, which
    a cell's metric averages, are shaded.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    summary = Summary(rows, last)
    keys, columns = summary.rows_and_columns()
    if not keys:
        _nothing_to_plot(plt, path)
        return
    columns = ["clean", *columns]
    width = min(4, len(keys))
    height = -(-len(keys) // width)
    fig, axes = plt.subplots(
        height,
        width,
        figsize=(4.0 * width, 3.1 * height + 0.6),
        sharey=True,
        squeeze=False,
    )
    colours = ["black", *plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    handles: dict[str, Any] = {}
    for ax, key in zip(axes.flat, keys, strict=False):
        strategy, split, f = key
        rounds_seen = 0
        for column, colour in zip(columns, colours, strict=False):
            curves = summary.curves.get(summary.find(key, column) or "", {})
            if not curves:
                continue
            rounds = sorted(set.intersection(*(set(c) for c in curves.values())))
            stats = [mean_interval([c[r] for c in curves.values()]) for r in rounds]
            (line,) = ax.plot(
                rounds, [s.mean for s in stats], color=colour, linewidth=1.2
            )
            handles.setdefault(column, line)
            if all(s.low is not None for s in stats):
                ax.fill_between(
                    rounds,
                    [s.low for s in stats],
                    [s.high for s in stats],
                    color=colour,
                    alpha=0.12,
                    linewidth=0,
                )
            rounds_seen = max(rounds_seen, max(rounds, default=0))
        if rounds_seen:
            ax.axvspan(rounds_seen - last + 0.5, rounds_seen + 0.5, color="#f0e6c8",
                       zorder=0)  # fmt: skip
        ax.set_title(f"{strategy} ({split}, f={f})", fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for line in axes[:, 0]:
        line.set_ylabel("test accuracy")
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(len(handles), 5),
        fontsize="small",
        frameon=False,
    )
    fig.suptitle(
        "mean across seeds, 95% band; shaded: the rounds a cell's metric averages",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_effect(rows: Sequence[Row], path: Path, *, last: int) -> None:
    """Plot the attack's effect (attacked minus clean, paired by seed) two ways.

    Left, a heatmap of the mean effect (``*``: the 95% interval excludes 0;
    ``n/a``: a cell that cannot run). Right, each seed's effect as a dot, with the
    mean and its 95% interval as a bar: how much the seeds agree.
    """
    plt = _pyplot()
    import numpy as np

    summary = Summary(rows, last)
    keys, columns = summary.rows_and_columns()
    if not keys:
        _nothing_to_plot(plt, path)
        return
    values = np.full((len(keys), len(columns)), np.nan)
    text = [["" for _ in columns] for _ in keys]
    points: list[tuple[float, list[float], Interval]] = []
    labels = [f"{s} ({sp}, f={f})" for s, sp, f in keys]
    spacing = 1.0 / (len(columns) + 1)
    for i, key in enumerate(keys):
        clean = summary.find(key, "clean")
        for j, column in enumerate(columns):
            attacked = summary.find(key, column)
            diff = summary.difference(attacked, clean)
            if diff is None or attacked is None or clean is None:
                continue
            values[i, j] = diff.mean
            text[i][j] = f"{diff.mean:+.2f}" + ("*" if diff.significant else "")
            a, b = summary.metric[attacked], summary.metric[clean]
            seeds = sorted(set(a) & set(b))
            offset = (j + 1) * spacing - 0.5
            points.append((i + offset, [a[s] - b[s] for s in seeds], diff))
    fig, (heat, dots) = plt.subplots(
        1,
        2,
        figsize=(1.6 * len(columns) + 9.5, 0.5 * len(keys) + 2.2),
        gridspec_kw={"width_ratios": [1.2 + 0.6 * len(columns), 5]},
    )
    heat.set_facecolor("#dddddd")
    finite = values[np.isfinite(values)]
    bound = max(0.05, float(np.abs(finite).max()) if finite.size else 0.0)
    image = heat.imshow(values, vmin=-bound, vmax=bound, cmap="RdBu", aspect="auto")
    for i in range(len(keys)):
        for j in range(len(columns)):
            heat.text(j, i, text[i][j] or "n/a", ha="center", va="center", fontsize=8)
    heat.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    heat.set_yticks(range(len(keys)), labels)
    heat.set_title("mean effect (*: 95% interval excludes 0)", fontsize=10)
    colorbar = fig.colorbar(image, ax=heat, fraction=0.08, pad=0.04)
    colorbar.set_label("attacked - clean accuracy", fontsize=9)
    dots.axvline(0, color="grey", linewidth=0.8)
    for y, per_seed, diff in points:
        dots.scatter(per_seed, [y] * len(per_seed), s=14, alpha=0.6, color="C0")
        low = diff.low if diff.low is not None else diff.mean
        high = diff.high if diff.high is not None else diff.mean
        dots.errorbar(
            diff.mean,
            y,
            xerr=[[diff.mean - low], [high - diff.mean]],
            fmt="D",
            color="C3" if diff.significant else "black",
            markersize=4,
            capsize=3,
        )
    dots.set_yticks(range(len(keys)), labels)
    dots.set_ylim(len(keys) - 0.5, -0.5)
    dots.set_xlabel("attacked - clean accuracy, paired by seed")
    dots.set_title(
        "each seed (dots), mean and 95% interval (red: excludes 0)"
        + (
            f"; attacks top to bottom: {', '.join(columns)}" if len(columns) > 1 else ""
        ),
        fontsize=9,
    )
    dots.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def unfinished(rows: Sequence[Row]) -> list[str]:
    """Return the keys of the cells in `rows` that lack some of their rounds.

    A cell that was reported invalid is finished; one that failed is not.
    """
    rounds = {r[ROW_CELL]: int(r["rounds"]) for r in rows}
    return sorted(cell for cell, n in rounds.items() if not is_finished(rows, cell, n))


def is_finished(rows: Sequence[Row], cell: str, rounds: int) -> bool:
    """Whether `cell` has all its rounds (or was reported invalid) in `rows`."""
    done = {
        r[ROW_ROUND]
        for r in rows
        if r[ROW_CELL] == cell and r.get(ROW_STATUS) == STATUS_OK
    }
    invalid = any(
        r[ROW_CELL] == cell and r.get(ROW_STATUS) == STATUS_INVALID for r in rows
    )
    return invalid or all(r in done for r in range(rounds + 1))
