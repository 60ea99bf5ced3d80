"""Load-generator workloads → :class:`SimRequest`, the way ``pdserve bench run`` sends them.

The sessions come from :func:`loadgen.workload.build` with the model's tokenizer (the same
text, hence the same token counts); each prompt is the chat template applied to the turn's
messages, exactly what the router tokenizes, and its block-hash chain is
:func:`common.hashing.block_hashes` of those ids — so shared system prompts share blocks as
on a real server. Open loop: sessions start at :func:`loadgen.driver.poisson_arrivals`
(same seed as bench run); closed loop is :class:`~capacity.sim.cluster.SimOptions`'
``concurrency``. A multi-turn chat's later turns carry the previous replies: here a
seeded text of the turn's ``max_tokens`` tokens stands for the reply the server gave.
"""

from __future__ import annotations

import random
from typing import Any

from capacity.sim.request import SimRequest
from common.hashing import block_hashes
from loadgen.driver import poisson_arrivals
from loadgen.workload import TextFactory, WorkloadSpec, build


def workload_requests(
    spec: WorkloadSpec, tokenizer: Any, *, rate: float | None, seed: int, block_size: int = 16
) -> list[SimRequest]:
    """The workload's requests; ``rate`` None (closed loop): every arrival at 0."""
    text = TextFactory(tokenizer.encode, tokenizer.decode)
    sessions = build(spec, text)
    starts = poisson_arrivals(len(sessions), rate, seed) if rate else [0.0] * len(sessions)
    rng = random.Random(seed + 1)
    out: list[SimRequest] = []
    for session, start in zip(sessions, starts, strict=True):
        replies: list[str] = []
        for k, turn in enumerate(session.turns):
            ids = tokenizer.apply_chat_template(session.messages(k, replies))
            out.append(
                SimRequest(
                    f"{session.session_id}.{k}" if session.num_requests > 1 else session.session_id,
                    start,
                    len(ids),
                    turn.max_tokens,
                    tuple(block_hashes(ids, block_size)),
                    group=session.group,
                    session_id=session.session_id,
                    turn=k,
                )
            )
            replies.append(text.text(turn.max_tokens, rng))
    return out
