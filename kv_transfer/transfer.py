"""One transfer, as the caller sees it: a handle to watch, wait for and abort.

``send`` / ``expect`` return a :class:`SendTransfer` / :class:`RecvTransfer`. Lifecycle:
``PENDING → TRANSFERRING → DONE | FAILED``; a transfer fails from any non-terminal state:
``abort()``, its deadline, the peer's abort, a broken connection. The transport moves it
along through ``transfer.control`` (:class:`~kv_transfer.control.TransferControl`, which
also says how it keeps the contract below); callers never use that.

The block contract, which is what makes stranded or reused blocks impossible:

* The caller passes a ``release`` callable when it registers the transfer. The transfer
  invokes it exactly once, with itself, after it became terminal, whatever the cause
  (done, abort, timeout, peer death, endpoint close). Senders typically unpin/free their
  source blocks there; receivers hand the blocks to decode if ``state is DONE`` and free
  them otherwise.
* Once ``release`` has run the transport never touches the blocks again, even if frames
  of the transfer are still draining off the wire; before it, it may still read (sender)
  or write (receiver) them.
* ``abort()`` and ``wait()`` return only after ``release`` has run: when ``abort()``
  returns, the blocks are the caller's again, whoever ended the transfer.

``release`` runs on whichever thread made the transfer terminal (a transport thread, the
deadline monitor, or the caller inside ``abort()``) or on the transport thread that
returned the last lease on the blocks; it must be quick and thread-safe, e.g. post the
block ids to the worker's event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kv_transfer.control import SendControl, TransferControl
from kv_transfer.errors import TransferAborted, TransferError
from kv_transfer.metrics import TransferMetrics, TransferStats
from kv_transfer.types import Role, TransferMode, TransferState

ReleaseFn = Callable[["Transfer"], None]
FailureHook = Callable[["Transfer", TransferError], None]


class Transfer:
    """Caller-facing handle: state, wait, abort, and the failure's cause.

    ``control`` is the transport's side (:class:`~kv_transfer.control.TransferControl`);
    callers never use it."""

    control: TransferControl

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
        self.transfer_id = transfer_id
        self.role = role
        self.block_ids = block_ids
        self.num_layers = num_layers
        self.created_at = time.monotonic()
        self.deadline = self.created_at + timeout_s
        self.control = self._new_control(release, stats, on_failure)

    def _new_control(
        self, release: ReleaseFn, stats: TransferStats | None, on_failure: FailureHook | None
    ) -> TransferControl:
        return TransferControl(self, release, stats, on_failure)

    @property
    def state(self) -> TransferState:
        return self.control.state

    @property
    def error(self) -> TransferError | None:
        """The cause when FAILED, else None."""
        return self.control.error

    @property
    def metrics(self) -> TransferMetrics | None:
        """Set once terminal."""
        return self.control.metrics

    @property
    def started_at(self) -> float | None:
        """``time.monotonic()`` when frames started to move, None before."""
        return self.control.started_at

    @property
    def ended_at(self) -> float | None:
        """``time.monotonic()`` of the terminal transition, None while live."""
        return self.control.ended_at

    def wait(self, timeout: float | None = None) -> TransferState:
        """Block until terminal (and ``release`` has run) or ``timeout``; return the state."""
        self.control.wait_released(timeout)
        return self.state

    def abort(self, reason: str = "aborted") -> bool:
        """Fail the transfer now; True if this call ended it (False if already terminal).

        Returns once ``release`` has run (after the frames in flight, if any, are through),
        so the blocks are the caller's again, whoever ended the transfer."""
        ended = self.control.fail(TransferAborted(f"{self.transfer_id}: {reason}"))
        if not self.control.in_release():  # from inside release it would wait for itself
            self.control.wait_released()
        return ended

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.transfer_id} {self.state.value}>"


class SendTransfer(Transfer):
    """Prefill side. In layer-wise mode the caller marks layers ready as it computes them."""

    control: SendControl

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
        record_ready: Callable[[], object | None] | None = None,
    ) -> None:
        self.mode = mode  # before the control is built: it starts from the mode's readiness
        # On CUDA: an event on the compute stream per ready point (one at send() in whole
        # mode, one per layer in layer-wise mode); the pair's stream waits on it before it
        # reads the layer, so the transfer never serialises the compute stream.
        self._record_ready = record_ready
        self.ready_events: list[object | None] = []
        if record_ready is not None and mode is TransferMode.WHOLE:
            self.ready_events.append(record_ready())
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

    def _new_control(
        self, release: ReleaseFn, stats: TransferStats | None, on_failure: FailureHook | None
    ) -> SendControl:
        return SendControl(self, release, stats, on_failure)

    @property
    def ready_layers(self) -> int:
        return self.control.ready_layers

    def mark_layer_ready(self, layer: int) -> None:
        """Layer ``layer``'s KV is final in the source blocks; layers come in order.

        A no-op in whole mode (everything was ready at ``send``), so a prefill loop can
        call it unconditionally."""
        if self.mode is not TransferMode.WHOLE:
            if self._record_ready is not None:
                self.ready_events.append(self._record_ready())  # before the pair thread wakes
            self.control.mark_layer_ready(layer)

    def ready_event(self, layers: int) -> object | None:
        """The compute-stream event after which ``layers`` layers are final (None on CPU)."""
        if not self.ready_events:
            return None
        index = 0 if self.mode is TransferMode.WHOLE else layers - 1
        return self.ready_events[min(index, len(self.ready_events) - 1)]


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
        return self.control.layers_done
