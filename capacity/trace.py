"""Trace files → :class:`~capacity.sim.SimRequest`: our JSONL and the Mooncake format.

Our JSONL, one request per line::

    {"arrival_s": 0.25, "input_tokens": 600, "output_tokens": 40,
     "prefix_group": "sys-a", "prefix_tokens": 512}          # or "block_hashes": [...]

``block_hashes`` (ints) give the prompt's hash chain directly; otherwise a
``prefix_group`` shares its first ``prefix_tokens`` (default: all of the prompt) with every
other request of the group, and the rest of the prompt is unique to the request.

Mooncake (FAST'25 traces)::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

``timestamp`` is in milliseconds; each ``hash_id`` names one 512-token block of the
prompt, and equal ids mean equal prefixes. Our blocks are ``block_size`` tokens (16 by
default), so Mooncake block ``h`` becomes ``512 // block_size`` of ours, each hashed from
``(h, sub-block index)`` and chained with :func:`common.hashing.hash_block`; only full
blocks of ours that lie inside ``input_length`` get a hash. Two requests that share their
first k Mooncake ids therefore share their first ``k * 512 // block_size`` blocks here.

Hashes are chained, so a synthesized chain is a prefix chain exactly like one computed from
token ids. Malformed lines raise ``ValueError`` naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from capacity.sim import SimRequest
from common.hashing import ROOT_HASH, hash_block

MOONCAKE_BLOCK_TOKENS = 512
_UNIQUE = 1 << 32  # salt space of request-unique blocks (apart from group / Mooncake ids)


def load_trace(path: str | Path, block_size: int = 16) -> list[SimRequest]:
    """Every request of ``path`` (JSONL or Mooncake, detected per line), by arrival."""
    lines = Path(path).read_text().splitlines()
    return parse_lines(lines, block_size, source=str(path))


def parse_lines(
    lines: Iterable[str], block_size: int = 16, source: str = "trace"
) -> list[SimRequest]:
    """Parse trace lines (blank lines skipped); sorted by arrival, stable."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[SimRequest] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("a line must be a JSON object")
            request = (
                _mooncake(row, block_size, len(out))
                if "hash_ids" in row
                else _jsonl(row, block_size, len(out))
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        out.append(request)
    return sorted(out, key=lambda r: r.arrival_s)


def _jsonl(row: dict[str, Any], block_size: int, index: int) -> SimRequest:
    prompt = _int(row, "input_tokens")
    request_id = str(row.get("request_id") or f"t{index:06d}")
    if "block_hashes" in row:
        hashes = tuple(int(h) for h in row["block_hashes"])
        if len(hashes) > prompt // block_size:
            raise ValueError(f"{len(hashes)} block_hashes for {prompt} tokens")
    else:
        group = row.get("prefix_group")
        shared = min(prompt, _int(row, "prefix_tokens", prompt)) if group is not None else 0
        hashes = synthesize_chain(str(group), shared, prompt, block_size, unique=index)
    return SimRequest(
        request_id,
        float(row["arrival_s"]),
        prompt,
        _int(row, "output_tokens"),
        hashes,
        priority=int(row.get("priority", 0)),
        client_id=str(row.get("client_id", "")),
    )


def _mooncake(row: dict[str, Any], block_size: int, index: int) -> SimRequest:
    prompt = _int(row, "input_length")
    ids = row["hash_ids"]
    if not isinstance(ids, list):
        raise ValueError("hash_ids must be a list")
    return SimRequest(
        str(row.get("request_id") or f"m{index:06d}"),
        float(row["timestamp"]) / 1e3,
        prompt,
        _int(row, "output_length"),
        mooncake_chain([int(h) for h in ids], prompt, block_size),
    )


def mooncake_chain(hash_ids: Sequence[int], prompt_tokens: int, block_size: int) -> tuple[int, ...]:
    """Our block-hash chain for a Mooncake prompt (see the module doc)."""
    per = max(1, MOONCAKE_BLOCK_TOKENS // block_size)
    full = prompt_tokens // block_size
    chain: list[int] = []
    parent = ROOT_HASH
    for hash_id in hash_ids:
        for sub in range(per):
            if len(chain) >= full:
                return tuple(chain)
            parent = hash_block(parent, (hash_id & 0xFFFFFFFF, sub))
            chain.append(parent)
    return tuple(chain)


def synthesize_chain(
    group: str, shared_tokens: int, prompt_tokens: int, block_size: int, unique: int
) -> tuple[int, ...]:
    """A chain whose first ``shared_tokens // block_size`` blocks depend only on ``group``
    and the rest on ``unique`` too."""
    salt = int.from_bytes(hashlib.blake2b(group.encode(), digest_size=4).digest(), "little")
    chain: list[int] = []
    parent = ROOT_HASH
    for i in range(prompt_tokens // block_size):
        if (i + 1) * block_size <= shared_tokens:
            tokens: tuple[int, ...] = (salt, i)
        else:
            tokens = (_UNIQUE - 1, unique & 0xFFFFFFFF, i)
        parent = hash_block(parent, tokens)
        chain.append(parent)
    return tuple(chain)


def _int(row: dict[str, Any], key: str, default: int | None = None) -> int:
    value = row.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if value < (0 if key == "prefix_tokens" else 1):
        raise ValueError(f"{key} must be positive, got {value}")
    return int(value)
