"""Start and stop Flower's own processes (a SuperLink, SuperNodes) and ``flwr run``.

The evaluation and the tests run Flower apps the way users do, with ``flwr run``,
against a SuperLink started here on a free loopback port (rather than the local
SuperLink that ``flwr run`` would start and leave running). Every process is started
in a session of its own and stopped by its process group on exit, also on an error,
so that no SuperLink, SuperNode or Ray worker outlives a run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

__all__ = [
    "ALLOCATOR_ENV",
    "RAY_ENV",
    "alive",
    "descendants",
    "flower_env",
    "flwr_run",
    "superlink",
]

BIN = Path(sys.executable).parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(home: Path) -> dict[str, str]:
    """Return the environment of Flower's processes: quiet, offline, under `home`."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # Ray's socket paths must stay under 108 bytes: a short folder
            "RAY_TMPDIR": _short_tmpdir(home),
            "PYTHONUNBUFFERED": "1",
            # the SuperLink starts flower-superexec by name: find this install's
            # even when its environment is not activated
            "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),
            # NumPy's OpenBLAS threads busy-wait after each call: in a process
            # whose torch work runs on its own thread(s) (the ServerApp's cells,
            # a ClientApp actor) they took a core from it; measured on two cores,
            # a cell-round of the paper preset cost 110 ms of CPU with them and
            # 84 ms without
            "OPENBLAS_NUM_THREADS": "1",
        }
    )
    # glibc's malloc hands the top of its heap back to the kernel once more than
    # twice its (adaptive) mmap threshold is free there, and each pass of the
    # vectorised FedSGD step or the central evaluation frees a few MB at once: the
    # next pass faults the same pages in again. Measured on two cores with the
    # paper preset's cells: 135,000 page faults a second in the ClientApp actors and
    # the ServerApp, 15.0 cell-rounds a second; with these, 130 a second and 19.0.
    # Allocations of 64 MiB and more still get their own mapping, given back on
    # free. A user's own settings of these, and of RAY_ENV's, are kept.
    for name, value in {**ALLOCATOR_ENV, **RAY_ENV}.items():
        env.setdefault(name, value)
    return env


ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(64 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
}

RAY_ENV = {
    # Ray returns an object over 100 KiB through its shared-memory object store,
    # which the raylet serves: a block's reply (51 partitions of the 1-D CNN,
    # 2.2 MB) cost the raylet 2.6 ms of CPU a cell-round on two cores; returned
    # with the call's reply, 0.3 ms, and Ray's workers spent no more on it.
    # Larger replies still go through the store.
    "RAY_max_direct_call_object_size": str(16 << 20),
    # A raylet starts default workers ahead of time for the first driver, but
    # Flower's actors need workers started with Flower's runtime_env: those two
    # were started, imported Ray on the cores the run's start-up needed, and sat
    # idle for the whole run.
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}


def _short_tmpdir(home: Path) -> str:
    """Return Ray's temporary folder for `home`, short enough for socket paths."""
    link = home / "ray-tmpdir"
    if not link.exists():
        link.write_text(tempfile.mkdtemp(prefix="ray"))
    return link.read_text()


def descendants(pid: int) -> list[int]:
    """Return the live descendants of `pid` (Linux ``/proc``; empty elsewhere).

    Flower's SuperExec starts ``flwr-simulation`` in a session of its own, and Ray's
    processes in it, so stopping the SuperLink's process group alone leaves them
    running: they are found here, through their parents, before anything is
    stopped.
    """
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie holds no resources
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _die_with_parent() -> None:
    """Run in a child before it starts: SIGTERM it when its parent dies (Linux).

    A SIGKILL to ``flwr-alie`` runs none of its clean-up; with this, the kernel
    still stops the SuperLink, SuperNodes and ``flwr run`` it started, and they stop
    theirs (SuperExec, the simulation, Ray).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop(
    processes: Sequence[subprocess.Popen[bytes] | subprocess.Popen[str]],
    patience: float = 10,
) -> None:
    """Stop `processes` and everything they started, by process group.

    SIGTERM to every process group among them and their descendants, then SIGKILL
    to what is left after `patience` seconds.
    """
    pids = [p.pid for p in processes]
    for proc in processes:
        pids += descendants(proc.pid)
    groups = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(pid))
    groups.discard(os.getpgrp())  # never this process's own group
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + patience
    for proc in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for proc in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def superlink(
    home: Path,
    *,
    simulation: bool,
    supernodes: int = 0,
    num_partitions: int = 0,
    finished: Path | None = None,
) -> Iterator[str]:
    """Run a SuperLink (and SuperNodes) on loopback; yield the connection's name.

    The connection is written to ``$FLWR_HOME/config.toml`` so that ``flwr run``
    finds it; all processes are stopped, by process group, on exit: given 10 s to
    exit after SIGTERM, or 1 s once `finished` exists (the file an app creates when
    it has written everything, :func:`flwr_run`): a simulation then spent 2 to 3 s
    more in Flower's and Ray's own shutdown.
    """
    env = flower_env(home)
    port = free_port()  # one HTTP port serves the Control, Fleet and Runtime APIs
    processes: list[subprocess.Popen[bytes]] = []
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = logs / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        processes.append(proc)
        return proc

    try:
        argv = [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--host", "127.0.0.1",
            "--port", str(port),
            # Flower's in-memory state; any other name is an SQLite file in the
            # working directory, shared by every SuperLink started there
            "--database", FLWR_IN_MEMORY_DB_NAME,
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if simulation:
            argv.append("--simulation")
        link = start("superlink", argv)
        _wait_for_port(port, link, logs / "superlink.log")
        for i in range(supernodes):
            node = start(
                f"supernode-{i}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink", f"127.0.0.1:{port}",
                    "--node-config",
                    f"partition-id={i} num-partitions={num_partitions or supernodes}",
                    "--host", "127.0.0.1",
                    "--port", str(free_port()),
                ],
            )  # fmt: skip
            assert node.poll() is None
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n'
            f'[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        yield "test"
    finally:
        done = finished is not None and finished.exists()
        _stop(processes, patience=1 if done else 10)
        shutil.rmtree(_short_tmpdir(home), ignore_errors=True)


def flwr_run(
    home: Path,
    app: Path,
    run_config: str,
    *,
    extra: Sequence[str] = (),
    timeout: float = 600,
    idle: bool = False,
    on_line: Callable[[str], None] | None = None,
    finished: Path | None = None,
    grace: float = 0.5,
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr run APP test --run-config ... --stream`` and wait for it.

    Each line of its output goes to `on_line` as it comes, when given; all of it is
    returned. The process group is killed after `timeout` seconds, or, with
    `idle`, once `timeout` seconds pass without a line of output.

    With `finished`, a file the app creates once it has written everything: `grace`
    seconds after it appears (for the log lines still on their way), ``flwr run`` is
    stopped and its return code is 0. Flower's own wind-down after an app's end
    (the simulation's threads, Ray's shutdown, the task's output) took 4 to 5 s
    on two cores; the caller's ``superlink`` stops what is left.
    """
    argv = [str(BIN / "flwr"), "run", str(app), "test", "--run-config", run_config,
            *extra, "--stream"]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        env=flower_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    deadline = [time.monotonic() + timeout]
    ended, expired, completed = threading.Event(), threading.Event(), threading.Event()
    step = 1.0 if finished is None else 0.1

    def watch() -> None:
        seen: float | None = None
        while not ended.wait(min(step, max(0.0, deadline[0] - time.monotonic()))):
            now = time.monotonic()
            if finished is not None and seen is None and finished.exists():
                seen = now
            if seen is not None and now - seen >= grace:
                completed.set()
                _stop([proc])
                return
            if now >= deadline[0]:
                expired.set()
                _stop([proc])
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if idle:
                deadline[0] = time.monotonic() + timeout
            if on_line is not None:
                on_line(line.rstrip("\n"))
        proc.wait()
    finally:
        ended.set()
        _stop([proc])
    if expired.is_set():
        quiet = "without a line of output" if idle else "in all"
        lines.append(f"ERROR: flwr run stopped after {timeout:g} s {quiet}\n")
    code = 0 if completed.is_set() else proc.returncode
    return subprocess.CompletedProcess(argv, code, "".join(lines), "")
