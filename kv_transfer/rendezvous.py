"""How a sender and a receiver find each other and build their pairwise process group.

The receiver (decode side) hosts a ``TCPStore`` server on a socket it binds itself
(``master_listen_fd``), so the port is known before anyone connects and the socket is on
the configured host only — 127.0.0.1 in tests and local runs. Its address is what the
decode worker hands to the prefill worker. Senders are store clients.

Join (sender-initiated, once per pair and again after every teardown)::

    S: queue_push("join", {name, handshake, reply key, proof})
    R (acceptor thread, blocked in queue_pop): check the proof, compare handshakes, pick
       the pair index k, set(reply key, {ok, error, handshake, k, proof}); if ok start the
       pair as rank 0
    S: wait(reply key); refused or no valid proof -> IncompatiblePeer; else join as rank 1
    both: ProcessGroupGloo | ProcessGroupNCCL over PrefixStore("pair/{k}/", store)

Proofs (with a cluster secret, :mod:`common.cluster_secret`): the sender's is an HMAC over
its name and its fresh reply key ("kv-join"), the receiver's an HMAC over that reply key
("kv-accept"), so each side knows the other holds the secret before any group exists and
any tensor moves. A side without a secret sends no proof and checks none; a side with one
refuses a peer whose proof is missing or wrong.

A queue rather than numbered keys: a sender that dies half-way leaves nothing behind that
could block the next one, and the acceptor blocks in one long ``queue_pop`` (woken by a
stop item on close) instead of polling — c10d logs a warning for every store wait that
times out.

The CPU and GPU paths differ only in :func:`new_pair_group` (constructor and options).
Blocking store waits hold a client's lock for their whole duration, so every thread that
waits gets its own client (:func:`connect_store`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from common.cluster_secret import ClusterSecret
from kv_transfer.errors import IncompatiblePeer, PeerLost
from kv_transfer.types import Handshake, PeerAddress

log = logging.getLogger(__name__)

JOIN_QUEUE = "join"
_STOP = "__stop__"


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=max(seconds, 0.001))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def start_store(host: str, port: int, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """A store server on a socket we bound (so it never listens beyond ``host``); returns
    the store and its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    store = dist.TCPStore(
        host,
        bound,
        None,
        True,
        _td(timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.fileno(),
    )
    # The store owns the listening descriptor now and closes it when it goes; a Python
    # socket object closing it too would close whatever reused that number meanwhile
    # (seen as "Broken pipe" on another pair's store connection when receivers come and go).
    sock.detach()
    return store, bound


def connect_store(address: PeerAddress, timeout_s: float) -> dist.TCPStore:
    try:
        return dist.TCPStore(
            address.host, address.port, None, False, _td(timeout_s), wait_for_workers=False
        )
    except (RuntimeError, ValueError) as exc:
        raise PeerLost(f"cannot reach receiver {address}: {_short(exc)}") from exc


def new_pair_group(
    store: dist.Store,
    pair: int,
    rank: int,
    device: torch.device,
    host: str,
    timeout_s: float,
    group_timeout_s: float | None = None,
) -> dist.ProcessGroup:
    """The 2-rank group of pair ``pair``; blocks until the peer constructs its side
    (``timeout_s``: the rendezvous). ``group_timeout_s`` is NCCL's watchdog timeout, which
    every wait of the transport stays below; gloo ops time out only inside a wait, so
    gloo's group timeout bounds just its rendezvous."""
    prefixed = dist.PrefixStore(f"pair/{pair}/", store)
    if backend_for(device) == "nccl":
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = _td(group_timeout_s or timeout_s)
        return dist.ProcessGroupNCCL(prefixed, rank, 2, nccl_opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _td(timeout_s)
    # Pin gloo to the configured address: no traffic leaves loopback in local runs even
    # without GLOO_SOCKET_IFNAME.
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, opts)


def destroy_group(group: dist.ProcessGroup | None) -> None:
    """Drop a pair's group; gloo closes its sockets, so the peer's pending ops fail fast."""
    if group is None:
        return
    if isinstance(group, getattr(dist, "ProcessGroupNCCL", ())):
        abort_nccl(group)


def abort_nccl(group: object) -> None:
    """Abort an NCCL communicator: its pending kernels end, its destructor cannot hang, and
    it frees its GPU memory. ``abort()`` where the build has it, else ``_shutdown()``."""
    for name in ("abort", "_shutdown", "shutdown"):
        method = getattr(group, name, None)
        if method is None:
            continue
        try:
            method()
            return
        except RuntimeError:
            log.debug("nccl %s failed", name, exc_info=True)


def request_join(
    store: dist.TCPStore,
    name: str,
    handshake: Handshake,
    address: PeerAddress,
    timeout_s: float,
    secret: ClusterSecret | None = None,
) -> int:
    """Sender side of the join; returns the pair index or raises IncompatiblePeer/PeerLost."""
    reply_key = f"join/reply/{name}/{uuid.uuid4().hex}"
    hello: dict[str, Any] = {"name": name, "handshake": handshake.to_dict(), "reply": reply_key}
    if secret is not None:
        hello["proof"] = secret.sign("kv-join", _join_text(name, reply_key))
    try:
        store.queue_push(JOIN_QUEUE, json.dumps(hello))
        store.wait([reply_key], _td(timeout_s))
        reply = json.loads(store.get(reply_key))
        store.delete_key(reply_key)
    except RuntimeError as exc:
        raise PeerLost(f"join with receiver {address} failed: {_short(exc)}") from exc
    if not reply["ok"]:
        refusal = f"receiver {address} refused us: {reply['error']}"
        if reply.get("incompatible"):
            raise IncompatiblePeer(refusal, by_peer=True)
        raise PeerLost(refusal, by_peer=True)  # e.g. shutting down
    if secret is not None and not secret.verify("kv-accept", reply_key, reply.get("proof")):
        raise IncompatiblePeer(f"receiver {address} did not prove the cluster secret")
    problem = handshake.mismatch(Handshake.from_dict(reply["handshake"]), "sender", "receiver")
    if problem:
        raise IncompatiblePeer(f"incompatible receiver {address}: {problem}")
    return int(reply["pair"])


JoinHandler = Callable[[int, str, Handshake], str | None]  # -> refusal text or None


class Acceptor:
    """Receiver side of the join: answers hellos in arrival order on its own client."""

    def __init__(
        self,
        store: dist.TCPStore,
        handshake: Handshake,
        on_join: JoinHandler,
        idle_timeout_s: float,
        secret: ClusterSecret | None = None,
    ) -> None:
        self._store = store  # only to push the stop item
        self._secret = secret
        self._client = store.clone()  # blocks in queue_pop; must not hold anyone else's lock
        self._client.set_timeout(_td(idle_timeout_s))
        self._handshake = handshake
        self._on_join = on_join
        self._thread = threading.Thread(target=self._run, name="kv-acceptor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        try:
            self._store.queue_push(JOIN_QUEUE, _STOP)
        except RuntimeError:
            return
        self._thread.join(timeout=5)

    def _run(self) -> None:
        pair = 0
        while True:
            try:
                raw = self._client.queue_pop(JOIN_QUEUE)
            except dist.DistStoreError:  # idle timeout: keep waiting
                continue
            except RuntimeError:  # the store is gone: nothing left to serve
                return
            if raw == _STOP.encode():
                return
            pair += 1
            try:
                self._answer(json.loads(raw), pair)
            except Exception:
                log.exception("join %d failed", pair)

    def _answer(self, hello: dict[str, Any], pair: int) -> None:
        try:
            theirs = Handshake.from_dict(hello["handshake"])
            problem = self._handshake.mismatch(theirs, "receiver", "sender")
        except TypeError as exc:  # another protocol version's fields
            theirs, problem = None, f"unreadable handshake ({exc})"
        name, reply_key = str(hello.get("name")), str(hello.get("reply"))
        if self._secret is not None and not self._secret.verify(
            "kv-join", _join_text(name, reply_key), hello.get("proof")
        ):
            problem = "no valid cluster-secret proof (is cluster_secret_file the same?)"
        if problem or theirs is None:
            error: str | None = f"incompatible KV peer: {problem}"
        else:
            error = self._on_join(pair, hello["name"], theirs)
        if error:
            log.warning("refused sender %s: %s", hello["name"], error)
        reply = {
            "ok": error is None,
            "incompatible": bool(problem),
            "error": error or "",
            "handshake": self._handshake.to_dict(),
            "pair": pair,
        }
        if self._secret is not None:
            reply["proof"] = self._secret.sign("kv-accept", reply_key)
        self._client.set(hello["reply"], json.dumps(reply))


def _join_text(name: str, reply_key: str) -> str:
    return f"{name}\0{reply_key}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
