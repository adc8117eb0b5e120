"""A tasker_core worker: LISTEN for wake-ups, claim steps, run handlers, report back.

The database does the orchestration (readiness, retries, backoff, leases, finalization); this
module only moves steps between SQL calls and Python functions:

    claim_steps -> handler(step) -> complete_step | fail_step     (heartbeat while it runs)

Threads: the caller's thread runs the claim loop, one listener thread blocks in LISTEN on its
own connection, one heartbeat thread extends the leases of running steps, one reporter thread
records outcomes in batches (one call at a time: what finishes during one goes in the next)
and, in the same transaction, claims steps for the slots they free (`report_and_claim`, so a
busy worker commits once per batch and a step that its parent made ready starts at once; with
tasker_core before 0.6.0, `report_steps`), and each claimed
step runs in its own daemon thread. Claims, reports and heartbeats take connections from a
pool (`psycopg_pool`). The claim loop sleeps on a pipe that wake-ups, finished steps and
signals write to: the signal handler only writes a byte, so it can never deadlock the loop.

A connection lost in the middle of recording outcomes (a failover, a restart) leaves their fate
unknown: the commit may or may not have happened. The reporter sends completions and permanent
failures again on a new connection until the server answers (while their lease lasts). That is
safe because the server applies an outcome only while this worker holds the step's lease, and
recording one of those ends the lease and finishes the step for good: a second send of an
outcome that was recorded finds the step no longer held (`lease_lost`) and changes nothing. A
retryable failure is not sent again (the step could already be claimed again, by this worker);
its lease expires and the step is retried. A claim lost the same way is simply made again;
steps it may have taken wait for their lease to expire and run then.
"""
from __future__ import annotations

import heapq
import json
import logging
import math
import os
import select
import signal
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

log = logging.getLogger("tasker_worker")

LEASE_LOST = "TK030"  # SQLSTATE: the worker no longer holds the step's lease


def create_task(conn: psycopg.Connection, namespace: str, name: str, context: Optional[dict] = None, *,
                version: Optional[str] = None, priority: Optional[int] = None,
                run_at: Any = None, delay_seconds: Optional[float] = None, **options: Any) -> int:
    """tasker_core.create_task on `conn`: starts a task of a registered template and returns its
    id. `priority` (-1000..1000, higher is claimed first), `run_at` (a timezone-aware datetime or
    a timestamptz string) or `delay_seconds` (a later start); other options (initiator, tags,
    idempotency_key, traceparent, ...) as the SQL function takes them."""
    if priority is not None:
        options["priority"] = priority
    if run_at is not None:
        options["run_at"] = run_at.isoformat() if hasattr(run_at, "isoformat") else run_at
    if delay_seconds is not None:
        options["delay_seconds"] = delay_seconds
    row = conn.execute("SELECT tasker_core.create_task(%s, %s, %s, %s::jsonb, %s::jsonb)",
                       (namespace, name, version, json.dumps(context or {}), json.dumps(options))).fetchone()
    return row[0]
CHANNEL = "tasker_ready"
TRACEBACK_CHARS = 2000

CLAIM_SQL = """
SELECT task_id, workflow_step_id, step_name, namespace, task_name, handler_class,
       handler_config, inputs, parent_results, attempt, tasker_core.task_traceparent(task_id)
FROM tasker_core.claim_steps(%s, %s::text[], %s, %s)"""
# with the worker's own trace (tasker_core 0.3.0): untraced tasks join it
CLAIM_TRACED_SQL = CLAIM_SQL.replace("%s, %s)", "%s, %s, %s)")
# many outcomes in one transaction (tasker_core 0.5.0)
REPORT_SQL = "SELECT workflow_step_id, outcome, backoff_seconds FROM tasker_core.report_steps(%s, %s::jsonb)"
# record outcomes and claim the next steps in one transaction (tasker_core 0.6.0); the
# reported steps' rows come first, then the claimed ones
REPORT_CLAIM_SQL = """
SELECT outcome, workflow_step_id, backoff_seconds, task_id, step_name, namespace, task_name,
       handler_class, handler_config, inputs, parent_results, attempt,
       CASE WHEN outcome = 'claimed' THEN tasker_core.task_traceparent(task_id) END
FROM tasker_core.report_and_claim(%s, %s::jsonb, %s::text[], %s, %s, %s)"""
HAS_SQL = """SELECT to_regprocedure('tasker_core.report_steps(text, jsonb)') IS NOT NULL,
                    to_regprocedure('tasker_core.report_and_claim(text, jsonb, text[], integer, integer, text)')
                    IS NOT NULL"""


class RetryableError(Exception):
    """A failure worth retrying; `retry_after` (seconds) overrides the server's backoff."""

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure that retrying cannot fix: the step is not retried and the task ends in error."""


@dataclass(frozen=True)
class Step:
    """What a handler gets: one claimed step, with everything it needs."""

    task_id: int
    step_id: int
    name: str
    namespace: str
    task_name: str
    handler_class: Optional[str]
    config: Dict[str, Any]
    inputs: Dict[str, Any]
    parent_results: Dict[str, Any]
    attempt: int
    traceparent: Optional[str] = None  # W3C trace context of the task, for the handler's span

    @property
    def element(self) -> Any:
        """A map step's instance: its element of the mapped array (its inputs are
        {"element": e, "index": i}); None for other steps."""
        return self.inputs.get("element") if self.is_map_instance else None

    @property
    def index(self) -> Optional[int]:
        """A map step's instance: the position of its element; None for other steps."""
        return self.inputs.get("index") if self.is_map_instance else None

    @property
    def is_map_instance(self) -> bool:
        return isinstance(self.inputs, dict) and set(self.inputs) == {"element", "index"}


@dataclass
class _Handler:
    fn: Callable[[Step], Any]
    timeout: Optional[float]


@dataclass
class _Outcome:
    ok: bool
    payload: str  # results or error, as JSON text
    retryable: bool = True
    retry_after: Optional[int] = None


class _Execution:
    def __init__(self, step: Step, lease_seconds: float):
        self.step = step
        self.reporting = False  # the handler is done and its outcome is being recorded
        self.released = False  # shutdown gave the step back: drop the outcome
        # when the lease ends unless renewed (claim, then each heartbeat): sending the outcome
        # later could only be refused, or meet a later claim of the step
        self.lease_until = time.monotonic() + lease_seconds


def _error(exc: BaseException, error_class: Optional[str] = None) -> str:
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__, limit=-5))
    return json.dumps({
        "message": str(exc) or cls.__name__,
        "error_class": error_class or name,
        "traceback": tb[-TRACEBACK_CHARS:],
    })


def _connection_lost(exc: BaseException) -> bool:
    """True when an error says the connection failed, not the statement: no connection could be
    had, it broke, or the server is shutting down or read-only (a failover under way). What the
    statement did is unknown then."""
    if isinstance(exc, PoolTimeout):
        return True
    state = _sqlstate(exc)
    if state is None:
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    return state.startswith("08") or state in ("57P01", "57P02", "57P03", "25006")


def _sqlstate(exc: BaseException) -> Optional[str]:
    return getattr(exc, "sqlstate", None)


class Worker:
    """Runs the steps of tasker_core tasks with registered Python handlers."""

    def __init__(self, conninfo: str = "", worker_id: Optional[str] = None,
                 namespaces: Optional[Iterable[str]] = None, batch_size: int = 4,
                 lease_seconds: float = 30, poll_interval: float = 1.0,
                 step_timeout: Optional[float] = None, grace_period: Optional[float] = None,
                 traceparent: Optional[Callable[[], Optional[str]]] = None,
                 flush_interval: float = 0.0, pool_size: int = 4):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if flush_interval < 0:
            raise ValueError("flush_interval must not be negative")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.conninfo = conninfo
        self.worker_id = worker_id or f"py-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.namespaces = [namespaces] if isinstance(namespaces, str) else (
            list(namespaces) if namespaces is not None else None)
        self.batch_size = batch_size
        self.lease_seconds = max(1, math.ceil(lease_seconds))
        self.poll_interval = poll_interval
        self.step_timeout = step_timeout
        self.grace_period = self.lease_seconds / 2 if grace_period is None else grace_period
        # the worker's current W3C trace context, asked at each claim (None: no trace)
        self.traceparent = traceparent
        # outcomes wait this long to be recorded with others in one transaction; whatever
        # finishes while a batch is being recorded goes in the next one anyway
        self.flush_interval = flush_interval
        self.pool_size = pool_size
        self._handlers: Dict[str, _Handler] = {}
        self._inflight: Dict[int, _Execution] = {}
        self._cv = threading.Condition()  # guards _inflight, _retry_at and _outbox
        self._retry_at: List[float] = []  # monotonic times when steps we failed become ready
        self._outbox: List[tuple] = []  # (execution, outcome) waiting for the reporter
        self._stopping = threading.Event()
        self._force = threading.Event()
        self._signals = 0  # signals received by this run; written only by the signal handler
        self._wake_r, self._wake_w = os.pipe()  # a byte wakes the claim loop
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pool: Optional[ConnectionPool] = None
        self._pool_lock = threading.Lock()
        self._batched = True  # the server has report_steps
        self._combined = True  # the server has report_and_claim
        self._reserved = 0  # slots of claims under way (guarded by _cv)
        self._done: Optional[threading.Event] = None  # set when run() winds its threads down

    # ------------------------------------------------------------------ registration
    def handler(self, handler_class: str, *, timeout: Optional[float] = None):
        """Decorator: `@worker.handler("Orders::Ship", timeout=10)` registers `fn(step)`."""
        def register(fn: Callable[[Step], Any]):
            if handler_class in self._handlers:
                raise ValueError(f"a handler for {handler_class!r} is already registered")
            self._handlers[handler_class] = _Handler(fn, timeout)
            return fn
        return register

    # ------------------------------------------------------------------ running
    def stop(self) -> None:
        """Stop claiming; run() then finishes or releases what it holds and returns."""
        self._stopping.set()
        self._poke()

    def _poke(self) -> None:
        """Wakes the claim loop (safe from any thread and from a signal handler)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # the pipe is full: the loop is awake anyway
            pass

    def _sleep(self, seconds: float) -> None:
        """Sleeps until poked or `seconds` pass, then forgets the pokes."""
        try:
            select.select([self._wake_r], [], [], seconds)
        except (InterruptedError, ValueError):
            pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _forced(self) -> bool:
        return self._force.is_set() or self._signals >= 2

    def run(self, until: Optional[Callable[[], bool]] = None) -> None:
        """Work until stop(), SIGTERM/SIGINT, or `until()` returns true (checked every 0.1 s)."""
        restore = self._install_signal_handlers()
        done = threading.Event()  # ends this run's listener, heartbeat and reporter threads
        self._done = done
        threads: List[threading.Thread] = []
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as probe:  # fails fast on a bad conninfo
                self._batched, self._combined = (bool(x) for x in probe.execute(HAS_SQL).fetchone())
            listener = psycopg.connect(self.conninfo, autocommit=True)
            try:
                listener.execute(f"LISTEN {CHANNEL}")
            except BaseException:
                listener.close()
                raise
            threads = [threading.Thread(target=self._listen, args=(listener, done), daemon=True,
                                        name=f"{self.worker_id}-listen"),
                       threading.Thread(target=self._heartbeat, args=(done,), daemon=True,
                                        name=f"{self.worker_id}-heartbeat"),
                       threading.Thread(target=self._reporter, args=(done,), daemon=True,
                                        name=f"{self.worker_id}-reporter")]
            for t in threads:
                t.start()
            log.info("worker %s started (namespaces %s)", self.worker_id, self.namespaces or "all")
            while not self._stopping.is_set():
                if self._signals:
                    log.info("signal: finishing in-flight steps (grace %ss)", self.grace_period)
                    break
                if until is not None and until():
                    break
                self._claim()
                self._sleep(self._wait_seconds(until is not None))
        finally:
            self._shutdown(done, threads)
            restore()

    def _wait_seconds(self, polling_until: bool) -> float:
        wait = min(self.poll_interval, 0.1) if polling_until else self.poll_interval
        with self._cv:
            now = time.monotonic()
            while self._retry_at and self._retry_at[0] <= now:
                heapq.heappop(self._retry_at)
            if self._retry_at:
                wait = min(wait, self._retry_at[0] - now)
        return max(wait, 0.0)

    def _reserve(self, finishing: int = 0) -> int:
        """Reserves the free slots for a claim (`finishing` steps are being reported by it)."""
        with self._cv:
            if self._stopping.is_set():
                return 0
            free = max(0, self.batch_size - len(self._inflight) + finishing - self._reserved)
            self._reserved += free
            return free

    def _unreserve(self, n: int) -> None:
        with self._cv:
            self._reserved -= n

    def _claim(self) -> None:
        free = self._reserve()
        if free <= 0:
            return
        tp = self.traceparent() if self.traceparent else None
        try:
            if tp is None:
                rows = self._sql(CLAIM_SQL, (self.worker_id, self.namespaces, free, self.lease_seconds))
            else:
                rows = self._sql(CLAIM_TRACED_SQL, (self.worker_id, self.namespaces, free, self.lease_seconds, tp))
        except psycopg.Error as e:
            if not _connection_lost(e):
                raise
            log.warning("claim failed: %s", e)  # connection trouble: try again after the poll interval
            return
        finally:
            self._unreserve(free)
        self._start(rows)

    def _start(self, rows: List[tuple]) -> None:
        """Runs claimed steps (rows of claim_steps' columns and the task's traceparent)."""
        for r in rows:
            step = Step(task_id=r[0], step_id=r[1], name=r[2], namespace=r[3], task_name=r[4],
                        handler_class=r[5], config=r[6] or {}, inputs=r[7] or {},
                        parent_results=r[8] or {}, attempt=r[9], traceparent=r[10])
            ex = _Execution(step, self.lease_seconds)
            with self._cv:
                # (an earlier execution of the step still reporting is superseded: see _sendable)
                self._inflight[step.step_id] = ex
            threading.Thread(target=self._execute, args=(ex,), daemon=True,
                             name=f"{self.worker_id}-step-{step.step_id}").start()

    # ------------------------------------------------------------------ one step
    def _execute(self, ex: _Execution) -> None:
        step = ex.step
        h = self._handlers.get(step.handler_class or "")
        if h is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            outcome = _Outcome(False, json.dumps({
                "message": f"no handler registered for handler_class {step.handler_class!r} "
                           f"on worker {self.worker_id} (registered: {known})",
                "error_class": "tasker_worker.UnknownHandler", "traceback": ""}), retryable=False)
        else:
            outcome = self._call(h, step)
        self._report(ex, outcome)

    def _call(self, h: _Handler, step: Step) -> _Outcome:
        timeout = h.timeout if h.timeout is not None else self.step_timeout
        if timeout is None:
            return self._invoke(h.fn, step)
        box: List[_Outcome] = []
        t = threading.Thread(target=lambda: box.append(self._invoke(h.fn, step)), daemon=True,
                             name=f"{self.worker_id}-handler-{step.step_id}")
        t.start()
        t.join(timeout)
        if box:
            return box[0]
        # Python cannot kill a thread: the handler is abandoned and its outcome ignored.
        log.warning("step %s (%s) timed out after %ss", step.step_id, step.handler_class, timeout)
        return _Outcome(False, json.dumps({
            "message": f"handler {step.handler_class} timed out after {timeout} s",
            "error_class": "TimeoutError", "traceback": ""}))

    @staticmethod
    def _invoke(fn: Callable[[Step], Any], step: Step) -> _Outcome:
        try:
            result = fn(step)
        except RetryableError as e:
            after = None if e.retry_after is None else max(0, math.ceil(e.retry_after))
            return _Outcome(False, _error(e), True, after)
        except PermanentError as e:
            return _Outcome(False, _error(e), False)
        except Exception as e:  # anything else is worth another attempt
            return _Outcome(False, _error(e), True)
        try:
            return _Outcome(True, json.dumps({} if result is None else result, allow_nan=False))
        except (TypeError, ValueError) as e:  # a bug in the handler: retrying returns the same
            return _Outcome(False, _error(e, "tasker_worker.ResultNotSerializable"), False)

    def _report(self, ex: _Execution, outcome: _Outcome) -> None:
        """Hands the outcome to the reporter thread."""
        with self._cv:
            if ex.released:
                return
            ex.reporting = True
            self._outbox.append((ex, outcome))
            self._cv.notify_all()

    def _reporter(self, done: threading.Event) -> None:
        """Records outcomes: whatever waited `flush_interval` after the first, in one call."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._outbox or done.is_set(), timeout=0.5)
                if not self._outbox:
                    if done.is_set():
                        return
                    continue
            if self.flush_interval > 0:
                time.sleep(self.flush_interval)
            with self._cv:
                batch, self._outbox = self._outbox, []
            try:
                self._record(batch)
            finally:
                with self._cv:
                    for ex, _ in batch:
                        if self._inflight.get(ex.step.step_id) is ex:  # not a later claim of it
                            del self._inflight[ex.step.step_id]
                    self._cv.notify_all()
                self._poke()

    def _resending(self, what: str, send: Callable[[bool], None]) -> None:
        """Calls `send(resent)` until it returns. A lost connection leaves the outcome of the call
        unknown: it is sent again (resent=True) on a new connection after a short pause. `send`
        drops, on a resend, the outcomes that must not go again (`_sendable`); the loop ends when
        the run winds down or a second signal forces the worker to stop. Any other error is
        raised."""
        resent = False
        while True:
            try:
                return send(resent)
            except Exception as e:
                if not _connection_lost(e) or self._forced() or (self._done is not None and self._done.is_set()):
                    raise
                log.warning("%s: connection lost (%s); sending again", what, str(e).strip() or type(e).__name__)
                resent = True
                time.sleep(min(1.0, self.poll_interval))

    def _sendable(self, ex: _Execution, outcome: _Outcome) -> bool:
        """Whether an outcome whose first send was cut off may be sent again. A completion or a
        permanent failure may: if the first send was recorded, the step is finished and no claim
        can take it again, so the resend is refused (TK030) and changes nothing. A retryable
        failure may not: if its first send was recorded, the step may already be claimed again
        by this worker (the claim half of that very call can take it when the backoff is 0), and
        a resend would count as the new attempt's failure. Not sent, it is as if the worker had
        died: the lease expires, the attempt counts, the step is retried. Nothing is sent once
        the lease has ended (it could only be refused) or a claim gave the step back to us."""
        if not outcome.ok and outcome.retryable:
            log.info("step %s: a retryable failure is not sent again (its lease will expire and the "
                     "step be retried)", ex.step.step_id)
            return False
        with self._cv:  # a claim gave the step to us again: this execution's lease has ended
            superseded = self._inflight.get(ex.step.step_id) is not ex
        if superseded or time.monotonic() >= ex.lease_until:
            log.info("step %s: outcome not sent again, its lease has ended (it was recorded, or the "
                     "step runs again)", ex.step.step_id)
            return False
        return True

    def _record(self, batch: List[tuple]) -> None:
        if self._batched:
            def send(resent: bool) -> None:
                live = [(ex, o) for ex, o in batch if self._sendable(ex, o)] if resent else batch
                if not live:
                    return
                free = self._reserve(len(live)) if self._combined else 0
                try:
                    self._record_batch(live, free, resent)
                finally:
                    if free:
                        self._unreserve(free)
            try:
                self._resending(f"recording {len(batch)} outcomes", send)
                return
            except Exception as e:
                if _connection_lost(e):
                    log.error("recording %d outcomes gave up (%s): their steps run again when the leases expire",
                              len(batch), e)
                    return
                # the whole batch was refused: one by one, so one bad outcome holds back no other
                log.warning("recording %d outcomes failed (%s); recording them one by one", len(batch), e)
        for ex, o in batch:
            self._record_one(ex, o)

    def _record_batch(self, batch: List[tuple], free: int, resent: bool = False) -> None:
        """One transaction: the outcomes, and with `free` slots the next steps (claimed in it)."""
        items = []
        for ex, o in batch:
            if o.ok:
                items.append('{"step_id": %d, "results": %s}' % (ex.step.step_id, o.payload))
            else:
                items.append('{"step_id": %d, "error": %s, "retryable": %s, "retry_after_seconds": %s}' % (
                    ex.step.step_id, o.payload, "true" if o.retryable else "false",
                    "null" if o.retry_after is None else int(o.retry_after)))
        outcomes = "[" + ",".join(items) + "]"
        by_id = {ex.step.step_id: ex for ex, _ in batch}
        if not self._combined:
            for step_id, outcome, backoff in self._sql(REPORT_SQL, (self.worker_id, outcomes)):
                self._recorded(by_id[step_id].step, outcome, backoff, resent)
            return
        tp = (self.traceparent() if self.traceparent else None) if free else None
        rows = self._sql(REPORT_CLAIM_SQL, (self.worker_id, outcomes, self.namespaces, free,
                                            self.lease_seconds, tp))
        claimed = []
        for r in rows:
            if r[0] == "claimed":
                claimed.append((r[3], r[1]) + tuple(r[4:]))
            else:
                self._recorded(by_id[r[1]].step, r[0], r[2], resent)
        self._start(claimed)

    def _record_one(self, ex: _Execution, outcome: _Outcome) -> None:
        step = ex.step

        def send(resent: bool) -> None:
            if resent and not self._sendable(ex, outcome):
                return
            try:
                if outcome.ok:
                    self._sql("SELECT tasker_core.complete_step(%s, %s, %s::jsonb)",
                              (step.step_id, self.worker_id, outcome.payload))
                    self._recorded(step, "completed", None)
                else:
                    backoff = self._sql("SELECT tasker_core.fail_step(%s, %s, %s::jsonb, %s, %s)",
                                        (step.step_id, self.worker_id, outcome.payload,
                                         outcome.retryable, outcome.retry_after))[0][0]
                    self._recorded(step, "failed", backoff)
            except Exception as e:
                if _sqlstate(e) != LEASE_LOST:
                    raise
                self._recorded(step, "lease_lost", None, resent)
        try:
            self._resending(f"step {step.step_id}: recording the outcome", send)
        except Exception as e:
            log.error("step %s: recording the outcome failed: %s", step.step_id, e)

    def _recorded(self, step: Step, outcome: str, backoff: Optional[int], resent: bool = False) -> None:
        if outcome == "completed":
            log.debug("step %s (%s) complete", step.step_id, step.handler_class)
        elif outcome == "failed":
            log.info("step %s (%s) failed%s", step.step_id, step.handler_class,
                     "" if backoff is None else f", retry in {backoff} s")
            if backoff is not None:  # wake up for the retry without waiting for a poll
                with self._cv:
                    heapq.heappush(self._retry_at, time.monotonic() + backoff + 0.05)
        elif resent:
            # the first send was recorded (it ended the lease), or the lease expired and the step
            # passed on: either way this send changed nothing
            log.info("step %s: outcome sent again after a lost connection; the step is no longer "
                     "held (recorded by the first send, or its lease passed on)", step.step_id)
        else:
            log.warning("step %s: lease lost, outcome dropped", step.step_id)

    # ------------------------------------------------------------------ background threads
    def _listen(self, conn: Optional[psycopg.Connection], done: threading.Event) -> None:
        while not (done.is_set() or self._stopping.is_set()):
            try:
                if conn is None:
                    conn = psycopg.connect(self.conninfo, autocommit=True)
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._poke()  # notifications may have been missed while disconnected
                # Any wake-up triggers a claim: payloads are not filtered by namespace, as
                # tasker_ready is sent once per transaction (naming only its first task) and
                # tick() names no namespace.
                for _ in conn.notifies(timeout=0.5):
                    self._poke()
            except psycopg.Error as e:
                log.warning("listener: %s; reconnecting", e)
                conn = self._close(conn)
                done.wait(self.poll_interval)
        self._close(conn)

    def _heartbeat(self, done: threading.Event) -> None:
        while not done.wait(self.lease_seconds / 3):
            with self._cv:
                running = [ex for ex in self._inflight.values() if not ex.reporting]
            for ex in running:
                try:
                    sent = time.monotonic()
                    self._sql("SELECT tasker_core.heartbeat(%s, %s)", (ex.step.step_id, self.worker_id))
                    ex.lease_until = sent + self.lease_seconds
                except Exception as e:
                    if not (ex.reporting or ex.released):
                        log.warning("step %s: heartbeat failed: %s", ex.step.step_id, e)

    # ------------------------------------------------------------------ shutdown
    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(_signum, _frame):
            # Only a counter and a byte on the pipe: taking a lock here could wait forever for
            # one the interrupted main thread holds. The claim loop and the shutdown read them.
            self._signals += 1
            self._poke()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore():
            for s, h in previous.items():
                signal.signal(s, h)
        return restore

    def _shutdown(self, done: threading.Event, threads: List[threading.Thread]) -> None:
        self.stop()
        deadline = time.monotonic() + self.grace_period
        with self._cv:
            while self._inflight and not self._forced() and time.monotonic() < deadline:
                self._cv.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            if self._forced():
                log.warning("second signal: releasing in-flight steps now")
            left = [ex for ex in self._inflight.values() if not ex.reporting]
            for ex in left:
                ex.released = True
                del self._inflight[ex.step.step_id]
        for ex in left:
            try:
                self._sql("SELECT tasker_core.release_step(%s, %s)", (ex.step.step_id, self.worker_id))
                log.info("step %s released", ex.step.step_id)
            except Exception as e:
                log.warning("step %s: release failed: %s", ex.step.step_id, e)
        with self._cv:  # outcomes being recorded right now
            self._cv.wait_for(lambda: not self._inflight, timeout=5)
        done.set()
        for t in threads:
            t.join(timeout=5)
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
        self._stopping.clear()  # run() may be called again
        self._force.clear()
        self._signals = 0
        log.info("worker %s stopped", self.worker_id)

    # ------------------------------------------------------------------ database
    def _sql(self, query: str, params: Any = None) -> List[tuple]:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(self.conninfo, min_size=1, max_size=self.pool_size,
                                            kwargs={"autocommit": True}, open=True,
                                            name=f"{self.worker_id}-pool")
            pool = self._pool
        try:
            # a broken connection is discarded by the pool; waiting for one is bounded, so a
            # lost server shows as PoolTimeout (a lost connection) instead of a stall
            with pool.connection(timeout=max(5.0, self.poll_interval)) as conn:
                cur = conn.execute(query, params)
                return cur.fetchall() if cur.description else []
        except Exception as e:
            if _connection_lost(e):
                self._drop_pool(pool)
            raise

    def _drop_pool(self, pool: ConnectionPool) -> None:
        """Replaces a pool whose server went away (a failover, a restart): its other connections
        are as dead as the one that failed, and it would reconnect with a growing backoff (1 s,
        2 s, 4 s...), long after a promoted standby took over. The next call makes a new pool,
        which connects at once (and, with a multi-host connection string, to the new primary)."""
        with self._pool_lock:
            if self._pool is not pool:
                return
            self._pool = None
        try:
            pool.close(timeout=0)
        except Exception:
            pass

    @staticmethod
    def _close(conn: Optional[psycopg.Connection]) -> None:
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        return None
