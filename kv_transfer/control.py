"""The transport's side of one transfer: its state machine, block access and progress.

Every transfer has one :class:`TransferControl` (``transfer.control``, a
:class:`SendControl` for a send). Only the transport that created the transfer drives it —
its pair threads, its deadline monitor, its table of expected transfers, its ``close`` —
the caller holds the :class:`~kv_transfer.transfer.Transfer` handle, whose ``state``,
``wait`` and ``abort`` read and use this object. Every method is thread-safe.

Block access, which is how ``release`` (see :mod:`kv_transfer.transfer`) can promise
that the transport is done with the blocks: the transport reads (sender) or writes
(receiver) the caller's blocks only while it holds the lock (``touching_blocks()``: the
fake transport's copies) or a *lease* (``lease()`` … ``return_lease()``: the torch
transport's copies, and its wire operations that read or write the blocks in place,
direct pieces). Both are granted only while the transfer is live. A terminal transition
takes the lock and refuses new leases at once, but ``release`` waits for the leases
already out: it runs right away if there are none, else on the transport thread that
returns the last one — at most the wire time of the frames in flight, since every lease
covers operations the peer is already committed to (a stalled connection bounds it by the
wire timeout, after which the pair is torn down and its operations end). So once
``release`` has run the transport never touches the blocks again, even if frames of the
transfer are still draining off the wire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kv_transfer.errors import TransferError, TransferTimeout
from kv_transfer.metrics import TransferMetrics, TransferStats
from kv_transfer.types import TransferMode, TransferState

if TYPE_CHECKING:
    from kv_transfer.transfer import FailureHook, ReleaseFn, SendTransfer, Transfer

log = logging.getLogger(__name__)


class TransferControl:
    """Moves one transfer along: transitions, block access, progress, ``release``.

    Transitions return True if this call made the change and False if the transfer had
    already moved on, so racing threads need no coordination of their own:

    * ``start()``: PENDING → TRANSFERRING — the pair that claimed the transfer, before any
      of its bytes goes on the wire;
    * ``succeed()``: live → DONE — the pair thread, once the receiver confirmed (sender) or
      every frame landed (receiver);
    * ``fail(error)``: live → FAILED — any transport thread, and the handle's ``abort()``;
    * ``expire(now)``: live → FAILED (timeout), once ``now`` is past the deadline — the
      deadline monitors.

    The terminal transitions record the metrics, call the failure hook (before ``release``:
    it tells the peer to stop, which may end the leases) and run ``release`` — at once, or
    when the last lease comes back.
    """

    def __init__(
        self,
        transfer: Transfer,
        release: ReleaseFn,
        stats: TransferStats | None,
        on_failure: FailureHook | None,
    ) -> None:
        if not callable(release):
            raise TypeError("release must be callable: it is how the caller gets its blocks back")
        self._transfer = transfer
        self._release = release
        self._stats = stats
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._finished = threading.Event()  # set once release has run
        self._state = TransferState.PENDING
        self._error: TransferError | None = None
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._metrics: TransferMetrics | None = None
        self._leases = 0  # wire operations that may still read / write the blocks in place
        self._release_due = False  # terminal, waiting for the last lease to run release
        self._releasing: threading.Thread | None = None  # the thread running release
        self._bytes = 0
        self._layers_done = 0

    # ---- what the handle reads ------------------------------------------------------------

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def error(self) -> TransferError | None:
        return self._error

    @property
    def metrics(self) -> TransferMetrics | None:
        return self._metrics

    @property
    def started_at(self) -> float | None:
        return self._started_at

    @property
    def ended_at(self) -> float | None:
        return self._ended_at

    @property
    def bytes_moved(self) -> int:
        """Payload bytes packed (sender) or landed (receiver) so far."""
        return self._bytes

    @property
    def layers_done(self) -> int:
        """Layers completely packed / landed so far (in layer order)."""
        return self._layers_done

    def wait_released(self, timeout: float | None = None) -> None:
        """For the handle's ``wait`` / ``abort``: until ``release`` has run, or ``timeout``."""
        self._finished.wait(timeout)

    def in_release(self) -> bool:
        """Whether the calling thread is the one running ``release`` (an ``abort()`` from
        inside it must not wait for itself)."""
        return threading.current_thread() is self._releasing

    # ---- transitions -----------------------------------------------------------------------

    def start(self) -> bool:
        """PENDING → TRANSFERRING; False if the transfer already ended (then the transport
        tells the peer to stop waiting instead of sending)."""
        with self._lock:
            if self._state is not TransferState.PENDING:
                return False
            self._state = TransferState.TRANSFERRING
            self._started_at = time.monotonic()
            return True

    def succeed(self) -> bool:
        """→ DONE: every block moved (sender: the receiver confirmed it)."""
        return self._finish(TransferState.DONE, None)

    def fail(self, error: TransferError) -> bool:
        """→ FAILED with ``error`` as the cause."""
        return self._finish(TransferState.FAILED, error)

    def expire(self, now: float) -> bool:
        """Fail with a timeout if the deadline has passed by ``now``; the monitors call it
        every ``poll_interval_s``."""
        if now < self._transfer.deadline or self._state.terminal:
            return False
        return self.fail(TransferTimeout(f"{self._transfer.transfer_id}: deadline passed"))

    # ---- block access and progress ---------------------------------------------------------

    @contextmanager
    def touching_blocks(self) -> Iterator[bool]:
        """Hold the lock while reading / writing the caller's blocks (a copy that ends
        before the ``with`` does); yields "still live" — touch them only if True."""
        with self._lock:
            yield not self._state.terminal

    def lease(self) -> bool:
        """Let copies and wire operations read / write the blocks in place until
        :meth:`return_lease`; False (and no lease) if the transfer is already terminal."""
        with self._lock:
            if self._state.terminal:
                return False
            self._leases += 1
            return True

    def return_lease(self) -> None:
        """Give back one lease once its operations are complete (or their pair is closed);
        the last one back after the terminal transition runs ``release``."""
        with self._lock:
            self._leases -= 1
            due = self._release_due and self._leases == 0
            if due:
                self._release_due = False
        if due:
            self._run_release()

    def add_progress(self, nbytes: int, layers_done: int) -> None:
        """A frame of ``nbytes`` was packed / landed; ``layers_done`` layers are complete."""
        with self._lock:
            self._bytes += nbytes
            self._layers_done = max(self._layers_done, layers_done)

    # ---- internals ---------------------------------------------------------------------------

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
                self._on_failure(self._transfer, error)
            except Exception:
                log.exception("failure hook of %s raised", self._transfer.transfer_id)
        if not deferred:
            self._run_release()
        return True

    def _run_release(self) -> None:
        self._releasing = threading.current_thread()
        try:
            self._release(self._transfer)
        except Exception:  # the transport must survive a buggy callback
            log.exception("release callback of %s raised", self._transfer.transfer_id)
        self._finished.set()

    def _make_metrics(self) -> TransferMetrics:
        t = self._transfer
        ended = self._ended_at if self._ended_at is not None else time.monotonic()
        started = self._started_at if self._started_at is not None else ended
        return TransferMetrics(
            transfer_id=t.transfer_id,
            role=t.role,
            state=self._state,
            failure=self._error.kind if self._error is not None else None,
            num_blocks=len(t.block_ids),
            bytes=self._bytes,
            queued_s=started - t.created_at,
            duration_s=ended - started,
            layers=self._layers_done,
        )


class SendControl(TransferControl):
    """A send's control, plus the layers the prefill has marked ready: the caller marks
    them (``SendTransfer.mark_layer_ready``), the pair thread waits for them."""

    def __init__(
        self,
        transfer: SendTransfer,
        release: ReleaseFn,
        stats: TransferStats | None,
        on_failure: FailureHook | None,
    ) -> None:
        super().__init__(transfer, release, stats, on_failure)
        whole = transfer.mode is TransferMode.WHOLE
        self._ready_layers = transfer.num_layers if whole else 0

    @property
    def ready_layers(self) -> int:
        return self._ready_layers

    def mark_layer_ready(self, layer: int) -> None:
        """For the handle: layer ``layer`` is final in the source blocks (in order)."""
        with self._cond:
            if layer != self._ready_layers:
                raise ValueError(f"expected layer {self._ready_layers} next, got {layer}")
            self._ready_layers += 1
            self._cond.notify_all()

    def wait_for_layers(self, count: int, timeout: float) -> bool:
        """The pair thread, before packing a layer-wise frame: wait until ``count`` layers
        are marked ready; False if the transfer ended or ``timeout`` passed first."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._ready_layers >= count or self._state.terminal, timeout
            )
            return self._ready_layers >= count and not self._state.terminal
