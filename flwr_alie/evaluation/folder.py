"""A run's results folder: one run at a time, resume, and what a killed run left.

- :class:`FolderLock`: a run holds an exclusive ``flock`` on ``DIR/.lock`` for its
  whole life (the kernel drops it when the process ends, even on SIGKILL); a second
  run into the same folder is refused at once, naming the holder's pid.
- :func:`prepare`: a folder that holds results is finished with ``--resume`` (the
  same options only; the refusal names the options that differ) or started again
  with ``--overwrite``.
- :func:`remove_stale_temporaries`: the temporary folders of runs killed by
  SIGKILL (their own, and Ray's) are removed at the next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from flwr_alie.evaluation.grid import Cell, load_cells, save_cells
from flwr_alie.evaluation.results import is_finished, read_rows
from flwr_alie.evaluation.wire import ROW_CELL

__all__ = [
    "FILES",
    "GRID",
    "LOCK",
    "RESULTS",
    "RUN",
    "TEMP_PREFIX",
    "FolderError",
    "FolderLock",
    "check_writable",
    "claim_temporary",
    "prepare",
    "remove_stale_temporaries",
    "run_options",
]

RESULTS, GRID, RUN, TABLE = "results.jsonl", "grid.json", "run.json", "table.md"
ACCURACY_PLOT, EFFECT_PLOT = "accuracy.png", "effect.png"
LOCK = ".lock"
FILES = (RESULTS, RESULTS + ".resume", GRID, RUN, TABLE, ACCURACY_PLOT, EFFECT_PLOT)
"""What a run writes into its folder."""
TEMP_PREFIX = "flwr-alie-"
"""The prefix of a run's temporary folder (its Flower home)."""
_OWNER = "owner"  # the pid of the run that made a temporary folder


class FolderError(ValueError):
    """The results folder cannot serve this run; the message says why."""


def check_writable(out: Path) -> None:
    """Raise :class:`FolderError` if `out` cannot be a results folder."""
    if out.exists() and not out.is_dir():
        raise FolderError(f"--out {out} is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FolderError(f"--out {out}: {parent} is not writable")


class FolderLock:
    """Hold `out` for one run: an exclusive, non-blocking ``flock`` on ``.lock``.

    The lock dies with the process. ``FolderError`` at once when another process
    holds it, naming that process's pid (written into the lock file).
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self._file: int | None = None

    def __enter__(self) -> FolderLock:
        """Take the lock, or raise naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderError(
                f"{self.path.parent} is in use by another flwr-alie run (pid "
                f"{holder}); wait for it to end, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._file = fd
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Drop the lock."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._file, 0)
            os.close(self._file)  # closing the descriptor drops the lock
            self._file = None


def run_options(out: Path) -> dict[str, object]:
    """Return what ``run.json`` of `out` says of the run (empty if nothing)."""
    try:
        loaded = json.loads((out / RUN).read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def prepare(
    out: Path,
    cells: list[Cell],
    *,
    resume: bool,
    overwrite: bool,
    options: dict[str, object],
) -> list[Cell]:
    """Make `out` ready for a run of `cells` (hold its lock); return those to run.

    Raises
    ------
    FolderError
        If `out` holds results and neither `resume` nor `overwrite` is set; or if
        `resume` finds a run of other options (named, with both values).
    """
    results = out / RESULTS
    has_results = results.exists() and results.stat().st_size > 0
    if has_results and not (resume or overwrite):
        raise FolderError(
            f"{out} already holds results; pass --resume to finish that run or "
            "--overwrite to start again"
        )
    if overwrite or not has_results:
        for name in FILES:
            (out / name).unlink(missing_ok=True)
        _write(out, cells, options)
        return cells
    if (out / GRID).exists():
        differ = _differences(load_cells(out / GRID), cells)
        if differ:
            raise FolderError(
                f"--resume: the options differ from the run in {out}: "
                f"{'; '.join(differ)}; use the same options, or --overwrite"
            )
    rows = read_rows(results)
    finished = {c.key for c in cells if is_finished(rows, c.key, c.rounds)}
    kept = [r for r in rows if r[ROW_CELL] in finished]
    partial = out / (RESULTS + ".resume")  # the results whole, or not at all
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(partial, results)
    _write(out, cells, options)
    return [c for c in cells if c.key not in finished]


def _write(out: Path, cells: list[Cell], options: dict[str, object]) -> None:
    save_cells(cells, out / GRID)
    (out / RUN).write_text(json.dumps(options, indent=1) + "\n")


def _differences(before: list[Cell], now: list[Cell]) -> list[str]:
    """Name the cell fields whose values differ between two grids, and the cells."""
    found = []
    for field in dataclasses.fields(Cell):
        old = sorted({repr(getattr(c, field.name)) for c in before})
        new = sorted({repr(getattr(c, field.name)) for c in now})
        if old != new:
            found.append(f"{field.name} was {', '.join(old)}, now {', '.join(new)}")
    if not found and {c.key for c in before} != {c.key for c in now}:
        found.append(f"the grid had {len(before)} cells, now {len(now)}")
    return found


def remove_stale_temporaries(root: Path | None = None) -> list[Path]:
    """Remove the temporary folders of runs that are gone; return them.

    A run's temporary folder (``flwr-alie-*`` in the system's temporary folder)
    names its run's pid in ``owner``; when that process is gone (a SIGKILL ran no
    clean-up), the folder and the Ray folder it points to are removed.
    """
    from flwr_alie.evaluation.runtime import alive

    root = Path(tempfile.gettempdir()) if root is None else root
    removed = []
    for folder in root.glob(TEMP_PREFIX + "*"):
        try:
            owner = int((folder / _OWNER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being written: leave it
        if alive(owner):
            continue
        ray = folder / "ray-tmpdir"
        with contextlib.suppress(OSError):
            shutil.rmtree(ray.read_text().strip(), ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def claim_temporary(folder: Path) -> None:
    """Mark `folder` as this run's, for :func:`remove_stale_temporaries`."""
    (folder / _OWNER).write_text(str(os.getpid()))
