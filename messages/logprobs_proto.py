""":class:`~common.logprobs.TokenLogprob` ↔ the ``TokenLogprob`` proto message.

``serving.proto`` and ``worker.proto`` declare the same message (same fields, same
numbers), so one pair of functions serves both: pass the generated class to build.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from common.logprobs import TokenLogprob


def logprob_to_proto(item: TokenLogprob, message_cls: Any) -> Any:
    message = message_cls(token_id=item.token_id, logprob=item.logprob)
    for token_id, logprob in item.top:
        message.top.add(token_id=token_id, logprob=logprob)
    return message


def logprobs_to_proto(items: Iterable[TokenLogprob] | None, message_cls: Any) -> list[Any]:
    """Proto messages for ``items`` (none when ``items`` is None)."""
    return [logprob_to_proto(item, message_cls) for item in items or ()]


def logprob_from_proto(message: Any) -> TokenLogprob:
    return TokenLogprob(
        token_id=message.token_id,
        logprob=message.logprob,
        top=tuple((top.token_id, top.logprob) for top in message.top),
    )


def logprobs_from_proto(messages: Iterable[Any]) -> tuple[TokenLogprob, ...]:
    return tuple(logprob_from_proto(message) for message in messages)
