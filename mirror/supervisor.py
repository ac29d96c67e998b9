"""`workers` > 1: one supervisor process, N workers serving one listener.

The supervisor (the process `mirror serve` started as) binds the sockets, then starts
the workers with multiprocessing's spawn (a fresh interpreter: no event loop, thread
or lock forked half-way) and hands each the listening sockets; the kernel gives each
new connection to whichever worker accepts it first. The supervisor serves nothing.

    supervisor ── worker 1 ── registry socket, admin socket (shared)
               ── worker 2 ──   "
               ── ...

- Start-up: worker 1 starts alone and recovers the cache (temp files of a previous
  run, orphans); the others start once it is ready. Their recovery, and that of a
  worker restarted later (after a back-off that grows while it keeps dying), finds
  live processes on the cache directory and leaves their downloads alone
  (`DiskStore.recover`); holding the store's serving lock from then on is what marks
  each worker as live for the next one.
- Readiness: a worker accepts connections on either socket only once its start-up is
  done, so whoever answers /readyz (or a registry request) is a ready worker: the
  group is ready while at least one worker is.
- Metrics: every worker writes to a shared prometheus_client multiprocess directory
  (mirror.metrics); the supervisor makes it empty at start and tells the library when
  a worker died, so its live gauges (downloads in flight) stop counting.
- Stop: SIGTERM or SIGINT to the supervisor becomes one SIGTERM to each worker, which
  drains as a single process does (mirror.server); a second one forces them. The
  supervisor exits 0 once every worker stopped cleanly. Workers stop by themselves if
  the supervisor disappears (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import uvicorn

from mirror.config import Settings

log = logging.getLogger("mirror.supervisor")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FIRST_BACKOFF = 0.5  # seconds before restarting a worker that died, doubled each time
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a worker that ran this long starts the back-off afresh
STARTUP_FAILURE = 3  # uvicorn's exit code for a failed start-up, kept for the group


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    ready: Connection | None = None  # the worker says its index here once serving
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        count: int,
        sock: socket.socket,
        admin_sock: socket.socket | None,
    ) -> None:
        # As a plain Settings: a --config file makes an instance of a class built at
        # run time (mirror.loading), which pickle cannot name for the workers.
        self.settings = Settings.model_construct(
            _fields_set=settings.model_fields_set, **dict(settings)
        )
        self.sock = sock
        self.admin_sock = admin_sock
        self.slots = [_Slot(i) for i in range(1, count + 1)]
        self.stopping = False
        self._serving = False  # worker 1 was ready once: from then on, deaths restart
        self._signals = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._metrics_dir, self._own_dir = _metrics_dir()

    # -- signals -------------------------------------------------------------------

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # Forwarded at once, from the handler: the loop below may be waiting.
        self._signals += 1
        if self._signals == 1:
            log.info("%s: stopping %d workers", signal.Signals(sig).name, len(self.slots))
        self.stopping = True
        for slot in self.slots:
            process = slot.process
            if process is not None and process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        # A full wake-up pipe means the loop is awake anyway.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- workers -------------------------------------------------------------------

    def _start(self, slot: _Slot, *, first: bool) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=run_worker,
            args=(
                WorkerArgs(
                    self.settings,
                    slot.index,
                    self.sock,
                    self.admin_sock,
                    self._metrics_dir,
                    first,
                    writer,
                ),
            ),
            name=f"mirror-worker-{slot.index}",
        )
        process.start()
        writer.close()  # the worker holds its end: EOF here means it is gone
        slot.process, slot.ready = process, reader
        slot.started_at = time.monotonic()
        slot.restart_at = None
        if self.stopping and process.pid is not None:
            # The signal came while this one was being spawned: it was not told.
            os.kill(process.pid, signal.SIGTERM)

    def _reap(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None and process.pid is not None
        process.join()
        code = process.exitcode if process.exitcode is not None else 1
        slot.exit_codes.append(code)
        if slot.ready is not None:
            slot.ready.close()
        slot.process, slot.ready = None, None
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
        if self.stopping or not self._serving:
            return  # a stop, or a start-up failure (`_run` says so and stops)
        lived = time.monotonic() - slot.started_at
        slot.failures = 0 if lived >= STABLE_AFTER else slot.failures + 1
        delay = min(FIRST_BACKOFF * 2 ** max(0, slot.failures - 1), MAX_BACKOFF)
        slot.restart_at = time.monotonic() + delay
        log.error(
            "worker %d (pid %d) %s after %.0f s; restarting it in %.1f s",
            slot.index,
            process.pid,
            _how(code),
            lived,
            delay,
        )

    def _alive(self) -> list[_Slot]:
        return [s for s in self.slots if s.process is not None]

    def _wait(self, timeout: float | None) -> None:
        """Until a worker exits or says it is ready, a signal, or `timeout`."""
        waitables: list[object] = [self._wake_r]
        for slot in self._alive():
            assert slot.process is not None
            waitables.append(slot.process.sentinel)
            if slot.ready is not None:
                waitables.append(slot.ready)
        for ready in wait(waitables, timeout):  # type: ignore[arg-type]
            if ready is self._wake_r:
                while True:
                    try:
                        if not self._wake_r.recv(64):
                            break
                    except BlockingIOError:
                        break
        for slot in self._alive():
            assert slot.process is not None
            if slot.ready is not None and slot.ready.poll():
                try:
                    slot.ready.recv()
                    log.info("worker %d ready (pid %d)", slot.index, slot.process.pid)
                except (EOFError, OSError):
                    pass  # it died before being ready: its sentinel says so
                slot.ready.close()
                slot.ready = None
            if not slot.process.is_alive():
                self._reap(slot)

    # -- the group -----------------------------------------------------------------

    def run(self) -> int:
        """Run the group until it is stopped; the exit code for `mirror serve`."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for slot in self._alive():  # only after an error of the supervisor itself
                assert slot.process is not None
                slot.process.kill()
                slot.process.join()
            if self._own_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._wake_r.close()
            self._wake_w.close()

    def _run(self) -> int:
        log.info("supervisor (pid %d) starting %d workers", os.getpid(), len(self.slots))
        first = self.slots[0]
        if not self.stopping:
            self._start(first, first=True)
        while first.process is not None and first.ready is not None and not self.stopping:
            self._wait(None)
        if first.process is None and not self.stopping:
            log.error("worker 1 %s before it was ready: stopping", _how(first.exit_codes[-1]))
            return STARTUP_FAILURE
        self._serving = True
        for slot in self.slots[1:]:
            if not self.stopping:
                self._start(slot, first=False)
        return self._supervise()

    def _supervise(self) -> int:
        deadline: float | None = None
        while True:
            now = time.monotonic()
            if self.stopping:
                if not self._alive():
                    break
                if deadline is None:
                    # The workers' own drain is shutdown_timeout; this is the backstop.
                    deadline = now + self.settings.shutdown_timeout + 10
                elif now >= deadline:
                    for slot in self._alive():
                        assert slot.process is not None
                        log.error("worker %d did not stop in time: killing it", slot.index)
                        slot.process.kill()
            else:
                for slot in self.slots:
                    if (
                        slot.process is None
                        and slot.restart_at is not None
                        and now >= slot.restart_at
                    ):
                        self._start(slot, first=False)
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due and not self.stopping else None
            if deadline is not None:
                timeout = max(0.0, deadline - now)
            self._wait(timeout)
        # A clean stop: every worker drained (exit 0); one still starting when the
        # SIGTERM came may have died of it, having served nothing.
        last = [s.exit_codes[-1] for s in self.slots if s.exit_codes]
        clean = all(code in (0, -signal.SIGTERM) for code in last)
        log.info("all workers stopped%s", "" if clean else f" (exit codes {last})")
        return 0 if clean else 1


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _metrics_dir() -> tuple[Path, bool]:
    """The group's metric files: the operator's PROMETHEUS_MULTIPROC_DIR (emptied: files
    of an earlier run would add to this one's counters), else a new private directory
    removed at exit. Set in the environment, which the workers inherit, so
    prometheus_client picks its multiprocess values at their first import."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path, own = Path(given), False
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        path, own = Path(tempfile.mkdtemp(prefix="mirror-metrics-")), True
        os.environ[MULTIPROC_ENV] = str(path)
    return path, own


# -- the worker side -----------------------------------------------------------------


@dataclass
class WorkerArgs:
    """What a worker is started with (pickled by multiprocessing; the sockets and the
    pipe travel as file descriptors)."""

    settings: Settings
    index: int
    sock: socket.socket
    admin_sock: socket.socket | None
    metrics_dir: Path
    first: bool  # the group's first worker, started alone
    ready: Connection


def run_worker(args: WorkerArgs) -> None:
    """A worker's main: the app, served on the inherited sockets until SIGTERM."""
    # ^C in a terminal reaches the whole group: the supervisor turns it into SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from mirror.app import create_app
    from mirror.logs import configure as configure_logging
    from mirror.server import serve_app, started
    from mirror.tls import server_tls
    from mirror.tuning import tune_malloc

    settings = args.settings
    configure_logging(settings.log_level, settings.log_format, worker=args.index)
    tune_malloc()
    parent = multiprocessing.parent_process()
    assert parent is not None and parent.pid is not None

    async def link(server: uvicorn.Server) -> None:
        if not await started(server):
            return
        args.ready.send(args.index)
        args.ready.close()
        # The supervisor's sentinel becomes readable when it is gone (even by SIGKILL):
        # a worker left alone would keep the port with nobody to stop or restart it.
        gone = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.sentinel, gone.set)
        try:
            await gone.wait()
        finally:
            loop.remove_reader(parent.sentinel)
        log.warning("the supervisor (pid %d) is gone: stopping", parent.pid)
        server.should_exit = True

    app = create_app(settings, multiprocess_dir=args.metrics_dir)
    served = serve_app(
        app,
        settings,
        args.sock,
        admin_sock=args.admin_sock,
        tls=server_tls(settings),  # checked by the supervisor: a worker builds its own
        supervised=link,
        # The first worker's admin listener answers (/healthz) while it recovers the
        # cache, as a single process does; a later worker's only once it serves, so a
        # restarting worker never answers /readyz 503 for a group that is ready.
        admin_after_start=not args.first,
    )
    sys.exit(0 if served else STARTUP_FAILURE)
