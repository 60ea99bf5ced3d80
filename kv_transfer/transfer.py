"""One transfer's state machine, shared by every transport (torch.distributed and fake).

Lifecycle: ``PENDING → TRANSFERRING → DONE | FAILED``. A transfer fails from any
non-terminal state: ``abort()``, its deadline, the peer's abort, a broken connection.

The block contract, which is what makes stranded or reused blocks impossible:

* The caller passes a ``release`` callable when it registers the transfer. The transfer
  invokes it exactly once, with itself, after it became terminal, whatever the cause
  (done, abort, timeout, peer death, endpoint close). Senders typically unpin/free their
  source blocks there; receivers hand the blocks to decode if ``state is DONE`` and free
  them otherwise.
* The transport reads (sender) or writes (receiver) the caller's blocks only while it
  holds the transfer's lock (``_touching_blocks()``: the fake transport's copies) or a
  *lease* (``_lease()`` … ``_unlease()``: the torch transport's copies, and its wire
  operations that read or write the blocks in place, direct pieces). Both are granted
  only while the transfer is live. A terminal transition takes the lock and refuses new
  leases at once, but ``release`` waits for the leases already out: it runs right away if
  there are none, else on the transport thread that returns the last one — at most the
  wire time of the frames in flight, since every lease covers operations the peer is
  already committed to (a stalled connection bounds it by the wire timeout, after which
  the pair is torn down and its operations end). So once ``release`` has run the
  transport never touches the blocks again, even if frames of the transfer are still
  draining off the wire.
* ``abort()`` and ``wait()`` return only after ``release`` has run: when ``abort()``
  returns, the blocks are the caller's again, whoever ended the transfer.

``release`` runs on whichever thread made the transfer terminal (a transport thread, the
deadline monitor, or the caller inside ``abort()``) or on the transport thread that
returned the last lease; it must be quick and thread-safe, e.g. post the block ids to the
worker's event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kv_transfer.errors import TransferAborted, TransferError, TransferTimeout
from kv_transfer.metrics import TransferMetrics, TransferStats
from kv_transfer.types import Role, TransferMode, TransferState

log = logging.getLogger(__name__)

ReleaseFn = Callable[["Transfer"], None]
FailureHook = Callable[["Transfer", TransferError], None]


class Transfer:
    """Caller-facing handle: poll, wait, abort, and the failure's cause."""

    def __init__(
        self,
        transfer_id: str,
        role: Role,
        block_ids: tuple[int, ...],
        num_layers: int,
        timeout_s: float,
        release: ReleaseFn,
        *,
        stats: TransferStats | None = None,
        on_failure: FailureHook | None = None,
    ) -> None:
        if not callable(release):
            raise TypeError("release must be callable: it is how the caller gets its blocks back")
        self.transfer_id = transfer_id
        self.role = role
        self.block_ids = block_ids
        self.num_layers = num_layers
        self.created_at = time.monotonic()
        self.deadline = self.created_at + timeout_s
        self._release = release
        self._stats = stats
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._finished = threading.Event()
        self._state = TransferState.PENDING
        self._error: TransferError | None = None
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._bytes = 0
        self._layers_done = 0
        self._metrics: TransferMetrics | None = None
        self._leases = 0  # wire operations that may still read / write the blocks in place
        self._release_due = False  # terminal, waiting for the last lease to run release
        self._releasing: threading.Thread | None = None  # the thread running release

    # ---- caller side -------------------------------------------------------------------

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def error(self) -> TransferError | None:
        """The cause when FAILED, else None."""
        return self._error

    @property
    def metrics(self) -> TransferMetrics | None:
        """Set once terminal."""
        return self._metrics

    @property
    def started_at(self) -> float | None:
        """``time.monotonic()`` when frames started to move, None before."""
        return self._started_at

    @property
    def ended_at(self) -> float | None:
        """``time.monotonic()`` of the terminal transition, None while live."""
        return self._ended_at

    def poll(self) -> TransferState:
        return self._state

    def wait(self, timeout: float | None = None) -> TransferState:
        """Block until terminal (and ``release`` has run) or ``timeout``; return the state."""
        self._finished.wait(timeout)
        return self._state

    def abort(self, reason: str = "aborted") -> bool:
        """Fail the transfer now; True if this call ended it (False if already terminal).

        Returns once ``release`` has run (after the frames in flight, if any, are through),
        so the blocks are the caller's again, whoever ended the transfer."""
        ended = self._fail(TransferAborted(f"{self.transfer_id}: {reason}"))
        if threading.current_thread() is not self._releasing:  # not from inside release
            self._finished.wait()
        return ended

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.transfer_id} {self._state.value}>"

    # ---- transport side (package-private) ----------------------------------------------

    def _start(self) -> bool:
        """PENDING → TRANSFERRING; False if the transfer already ended."""
        with self._lock:
            if self._state is not TransferState.PENDING:
                return False
            self._state = TransferState.TRANSFERRING
            self._started_at = time.monotonic()
            return True

    @contextmanager
    def _touching_blocks(self) -> Iterator[bool]:
        """Hold the lock while reading/writing the caller's blocks; yields "still live"."""
        with self._lock:
            yield not self._state.terminal

    def _lease(self) -> bool:
        """Let wire operations read / write the blocks in place until ``_unlease``; False
        (and no lease) if the transfer is already terminal."""
        with self._lock:
            if self._state.terminal:
                return False
            self._leases += 1
            return True

    def _unlease(self) -> None:
        """Return a lease once its operations are complete (or their pair is closed); the
        last one out after the terminal transition runs ``release``."""
        with self._lock:
            self._leases -= 1
            due = self._release_due and self._leases == 0
            if due:
                self._release_due = False
        if due:
            self._run_release()

    def _progress(self, nbytes: int, layers_done: int) -> None:
        with self._cond:
            self._bytes += nbytes
            self._layers_done = max(self._layers_done, layers_done)

    def _succeed(self) -> bool:
        return self._finish(TransferState.DONE, None)

    def _fail(self, error: TransferError) -> bool:
        return self._finish(TransferState.FAILED, error)

    def _expire(self, now: float) -> bool:
        """Fail with a timeout if the deadline has passed."""
        if now < self.deadline or self._state.terminal:
            return False
        return self._fail(TransferTimeout(f"{self.transfer_id}: deadline passed"))

    def _finish(self, state: TransferState, error: TransferError | None) -> bool:
        with self._cond:
            if self._state.terminal:
                return False
            self._state = state
            self._error = error
            self._ended_at = time.monotonic()
            # Set with the state, so whoever sees a terminal state also sees the metrics.
            self._metrics = self._make_metrics()
            deferred = self._release_due = self._leases > 0
            self._cond.notify_all()  # wakes a sender waiting for a layer that will never come
        if self._stats is not None:
            self._stats.record(self._metrics)
        if error is not None and self._on_failure is not None:
            try:  # before release: it tells the peer to stop, which may end the leases
                self._on_failure(self, error)
            except Exception:
                log.exception("failure hook of %s raised", self.transfer_id)
        if not deferred:
            self._run_release()
        return True

    def _run_release(self) -> None:
        self._releasing = threading.current_thread()
        try:
            self._release(self)
        except Exception:  # the transport must survive a buggy callback
            log.exception("release callback of %s raised", self.transfer_id)
        self._finished.set()

    def _make_metrics(self) -> TransferMetrics:
        ended = self._ended_at if self._ended_at is not None else time.monotonic()
        started = self._started_at if self._started_at is not None else ended
        return TransferMetrics(
            transfer_id=self.transfer_id,
            role=self.role,
            state=self._state,
            failure=self._error.kind if self._error is not None else None,
            num_blocks=len(self.block_ids),
            bytes=self._bytes,
            queued_s=started - self.created_at,
            duration_s=ended - started,
            layers=self._layers_done,
        )


class SendTransfer(Transfer):
    """Prefill side. In layer-wise mode the caller marks layers ready as it computes them."""

    def __init__(
        self,
        transfer_id: str,
        block_ids: tuple[int, ...],
        num_layers: int,
        timeout_s: float,
        release: ReleaseFn,
        *,
        mode: TransferMode,
        stats: TransferStats | None = None,
        on_failure: FailureHook | None = None,
    ) -> None:
        super().__init__(
            transfer_id,
            Role.SENDER,
            block_ids,
            num_layers,
            timeout_s,
            release,
            stats=stats,
            on_failure=on_failure,
        )
        self.mode = mode
        self._ready_layers = self.num_layers if mode is TransferMode.WHOLE else 0

    @property
    def ready_layers(self) -> int:
        return self._ready_layers

    def mark_layer_ready(self, layer: int) -> None:
        """Layer ``layer``'s KV is final in the source blocks; layers come in order.

        A no-op in whole mode (everything was ready at ``send``), so a prefill loop can
        call it unconditionally."""
        if self.mode is TransferMode.WHOLE:
            return
        with self._cond:
            if layer != self._ready_layers:
                raise ValueError(f"expected layer {self._ready_layers} next, got {layer}")
            self._ready_layers += 1
            self._cond.notify_all()

    def mark_all_ready(self) -> None:
        with self._cond:
            self._ready_layers = self.num_layers
            self._cond.notify_all()

    def _wait_layers(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` layers are ready; False if terminal or timed out first."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._ready_layers >= count or self._state.terminal, timeout
            )
            return self._ready_layers >= count and not self._state.terminal


class RecvTransfer(Transfer):
    """Decode side. ``layers_landed`` grows in layer order as chunks are scattered."""

    def __init__(
        self,
        transfer_id: str,
        block_ids: tuple[int, ...],
        num_layers: int,
        timeout_s: float,
        release: ReleaseFn,
        *,
        stats: TransferStats | None = None,
        on_failure: FailureHook | None = None,
    ) -> None:
        super().__init__(
            transfer_id,
            Role.RECEIVER,
            block_ids,
            num_layers,
            timeout_s,
            release,
            stats=stats,
            on_failure=on_failure,
        )

    @property
    def layers_landed(self) -> int:
        return self._layers_done
