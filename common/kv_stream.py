"""The KV stream entry codec: a worker's KV events as the fields of a Redis stream entry.

One stream per pool (:mod:`common.registry` owns the keys); every entry is a flat map of
strings::

    worker_id, type ("stored" | "evicted" | "clear"), block_hash, parent_hash, block_id

with decimal numbers and "" where the type has no such field. A reader skips (and logs)
an entry it cannot read, so a newer writer never breaks an older router.
"""

from __future__ import annotations

import logging

from common.kv_events import AllBlocksCleared, BlockEvicted, BlockStored, StreamEvent

log = logging.getLogger(__name__)


def encode_entry(worker_id: str, event: StreamEvent) -> dict[str, str]:
    """The stream entry fields of one event of ``worker_id``."""
    if isinstance(event, BlockStored):
        typ, parent = "stored", str(event.parent_hash)
    elif isinstance(event, BlockEvicted):
        typ, parent = "evicted", ""
    elif isinstance(event, AllBlocksCleared):
        return clear_entry(worker_id)
    else:
        raise TypeError(f"not a KV event: {event!r}")
    return {
        "worker_id": worker_id,
        "type": typ,
        "block_hash": str(event.block_hash),
        "parent_hash": parent,
        "block_id": str(event.block_id),
    }


def clear_entry(worker_id: str) -> dict[str, str]:
    """The fields of an :class:`AllBlocksCleared` marker of ``worker_id``."""
    return {
        "worker_id": worker_id,
        "type": "clear",
        "block_hash": "",
        "parent_hash": "",
        "block_id": "",
    }


def decode_entry(fields: dict[str, str]) -> tuple[str, StreamEvent] | None:
    """(worker_id, event), or None for an entry this version cannot read (logged, skipped)."""
    try:
        worker_id, typ = fields["worker_id"], fields["type"]
        if typ == "stored":
            h, p, b = (int(fields[f]) for f in ("block_hash", "parent_hash", "block_id"))
            return worker_id, BlockStored(block_hash=h, parent_hash=p, block_id=b)
        if typ == "evicted":
            h, b = int(fields["block_hash"]), int(fields["block_id"])
            return worker_id, BlockEvicted(block_hash=h, block_id=b)
        if typ == "clear":
            return worker_id, AllBlocksCleared()
    except (KeyError, ValueError):
        pass
    log.warning("skipping unreadable KV stream entry %r", fields)
    return None
