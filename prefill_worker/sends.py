"""In flight: the KV sends of prefilled prompts, started from inside the engine step.

The engine calls :meth:`SendTracker.after_layer` on its own thread as each layer's KV of
the step's chunks is in the cache. For a tracked request whose *final* prompt chunk is in
the step (``chunk.samples``: every earlier chunk's KV is complete in all layers), the
tracker starts its send:

* layer-wise — at layer 0, then marks each layer ready as it completes, so the transfer
  of layer ``l`` overlaps the computation of layers ``l+1 …``;
* whole — at the last layer, when every layer's KV is final.

Either way the send starts before the step returns; the first token is sampled after it.

Block ownership: the engine request is created with ``hold_blocks``, so its blocks outlive
it until ``free_request`` aborts it. That happens exactly when nothing can read them any
more: in the transfer's ``release`` callback (terminal: done, failed, aborted), or in
:meth:`SendTracker.close` when no transfer was ever started. ``close`` aborts a live
transfer first, so the asyncio side must call it *before* abandoning the engine stream.
Blocks of a successful send stay in the prefix cache, unreferenced — that is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from kv_transfer.interfaces import KVSender
from kv_transfer.transfer import SendTransfer, Transfer
from kv_transfer.types import PeerAddress, SendSpec, TransferMode, TransferState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendPlan:
    transfer_id: str
    peer: PeerAddress
    num_blocks: int  # the decode worker reserved this many; the prompt must fill them
    layer_wise: bool
    deadline: float | None  # time.monotonic(); None: the sender's default timeout


class PendingSend:
    """One request's send: planned on the loop thread, started on the engine thread."""

    def __init__(self, request_id: str, plan: SendPlan, done: asyncio.Future[TransferState]):
        self.request_id = request_id
        self.plan = plan
        self.done = done  # resolved on the loop with the terminal state
        self.transfer: SendTransfer | None = None  # set under the tracker's lock
        self.error: str | None = None  # why no transfer was started
        self.closed = False


class SendTracker:
    def __init__(
        self, sender: KVSender, num_layers: int, free_request: Callable[[str], None]
    ) -> None:
        self._sender = sender
        self._last_layer = num_layers - 1
        self._free_request = free_request  # thread-safe: posts an abort to the engine thread
        self._lock = threading.Lock()
        self._pending: dict[str, PendingSend] = {}

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(
                1
                for p in self._pending.values()
                if p.transfer is not None and not p.transfer.state.terminal
            )

    @property
    def tracked(self) -> int:
        return len(self._pending)

    # ---- loop thread ----------------------------------------------------------------------

    def track(self, request_id: str, plan: SendPlan) -> PendingSend:
        pending = PendingSend(request_id, plan, asyncio.get_running_loop().create_future())
        with self._lock:
            self._pending[request_id] = pending
        return pending

    def close(self, pending: PendingSend) -> None:
        """End tracking; abort a live transfer, or free the blocks if none was started.

        Synchronous: safe in a cancelled coroutine, and the abort is complete (the transport
        no longer reads the blocks) when it returns.
        """
        with self._lock:
            pending.closed = True
            self._pending.pop(pending.request_id, None)
            transfer = pending.transfer
        if transfer is not None:
            transfer.abort("prefill request ended")  # no-op if terminal; release frees
        else:
            self._free_request(pending.request_id)

    # ---- engine thread ----------------------------------------------------------------------

    def after_layer(self, layer: int, output: SchedulerOutput) -> None:
        if not self._pending:
            return
        for chunk in output.scheduled:
            if not chunk.samples:
                continue
            with self._lock:
                pending = self._pending.get(chunk.seq.request_id)
            if pending is None:
                continue
            try:
                if pending.plan.layer_wise:
                    if layer == 0:
                        self._start(pending, chunk.seq)
                    if pending.transfer is not None:
                        pending.transfer.mark_layer_ready(layer)
                elif layer == self._last_layer:
                    self._start(pending, chunk.seq)
            except Exception as exc:  # never fail the engine step for one request's send
                log.exception("KV send of %s failed", pending.request_id)
                pending.error = f"KV send failed: {exc}"
                if pending.transfer is not None:
                    pending.transfer.abort(pending.error)

    def _start(self, pending: PendingSend, seq: Sequence) -> None:
        plan = pending.plan
        blocks = tuple(seq.block_table)
        with self._lock:
            if pending.closed or pending.transfer is not None:
                return
            if len(blocks) != plan.num_blocks:
                pending.error = f"prompt fills {len(blocks)} blocks, {plan.num_blocks} reserved"
                return
            timeout = None
            if plan.deadline is not None:
                timeout = max(plan.deadline - time.monotonic(), 0.001)
            mode = TransferMode.LAYERWISE if plan.layer_wise else TransferMode.WHOLE
            spec = SendSpec(plan.transfer_id, plan.peer, blocks, mode, timeout)
            pending.transfer = self._sender.send(spec, self._on_release(pending))

    def _on_release(self, pending: PendingSend) -> Callable[[Transfer], None]:
        loop = pending.done.get_loop()

        def release(transfer: Transfer) -> None:  # any thread, exactly once
            self._free_request(pending.request_id)
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(_resolve, pending.done, transfer.state)

        return release


def _resolve(future: asyncio.Future[TransferState], state: TransferState) -> None:
    if not future.done():
        future.set_result(state)
