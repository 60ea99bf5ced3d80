"""Signed registry values: what a reader with the cluster secret trusts.

With a cluster secret (:mod:`common.cluster_secret`) a worker's WorkerInfo JSON in Redis
carries ``"signature"`` (HMAC "worker" over the JSON without it) and each KV stream entry
a ``sig`` field (HMAC "kv-event" over its other fields). :class:`RegistrySigning` adds
them on the write side and checks them on the read side; refusals are logged once per
worker. Without a secret it writes plain values and accepts everything.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from common.cluster_secret import ClusterSecret
from common.worker_info import WorkerInfo

log = logging.getLogger("common.registry")  # refusals read as the registry's


class RegistrySigning:
    """Signs registrations written and checks those read, when there is a secret."""

    def __init__(self, secret: ClusterSecret | None) -> None:
        self._secret = secret
        self._refused: set[str] = set()  # worker ids already logged

    def encode(self, info: WorkerInfo) -> str:
        text = info.to_json()
        if self._secret is None:
            return text
        data = json.loads(text)
        data["signature"] = self._secret.sign("worker", text)
        return _canonical(data)

    def decode(self, raw: str) -> WorkerInfo:
        """The registration in ``raw``; ValueError if it is malformed or, with a secret,
        not signed with it."""
        info = WorkerInfo.from_json(raw)
        if self._secret is None:
            return info
        data = json.loads(raw)
        signature = data.pop("signature", None)
        if not self._secret.verify("worker", _canonical(data), signature):
            raise UnsignedRegistration(
                f"registration of {info.worker_id!r} is "
                + ("not signed" if signature is None else "signed with another secret")
            )
        return info

    def entry(self, fields: dict[str, str]) -> dict[str, str]:
        """A KV stream entry's fields, signed (``sig``) when there is a secret."""
        if self._secret is not None:
            fields["sig"] = self._secret.sign("kv-event", _entry_text(fields))
        return fields

    def entry_ok(self, fields: dict[str, str]) -> bool:
        """Whether to read a KV stream entry: always without a secret, else if signed."""
        if self._secret is None:
            return True
        signed = {k: v for k, v in fields.items() if k != "sig"}
        if self._secret.verify("kv-event", _entry_text(signed), fields.get("sig")):
            return True
        worker_id = fields.get("worker_id", "?")
        if self.first_refusal(f"kv:{worker_id}"):
            log.warning("ignoring unsigned KV events of worker %s (no cluster secret?)", worker_id)
        return False

    def first_refusal(self, worker_id: str) -> bool:
        if worker_id in self._refused:
            return False
        if len(self._refused) >= 10_000:  # a flood of fake ids must not grow it forever
            self._refused.clear()
        self._refused.add(worker_id)
        return True


class UnsignedRegistration(ValueError):
    """A registration without a valid cluster-secret signature (ignored by readers)."""


def _entry_text(fields: dict[str, str]) -> str:
    return "\n".join(f"{k}={fields[k]}" for k in sorted(fields))


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)  # as WorkerInfo.to_json
