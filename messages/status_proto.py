""":class:`~messages.status.WorkerStatus` ↔ ``worker_pb2.WorkerStatus``: used by the
``WorkerControl`` servicer (:mod:`worker.control`) and by whoever calls ``GetStatus``."""

from __future__ import annotations

import dataclasses

from messages.status import WorkerStatus
from proto import worker_pb2

_FIELDS = tuple(f.name for f in dataclasses.fields(WorkerStatus))


def status_to_proto(status: WorkerStatus) -> worker_pb2.WorkerStatus:
    return worker_pb2.WorkerStatus(**{name: getattr(status, name) for name in _FIELDS})


def status_from_proto(message: worker_pb2.WorkerStatus) -> WorkerStatus:
    return WorkerStatus(**{name: getattr(message, name) for name in _FIELDS})
