"""pdserve router: the public gRPC API (``pdserve.v1.Generation``) and routing.

A request's path through the modules::

    service        the servicer: api_proto (the one serving_pb2 ↔ api conversion) in and
                   out, RequestError → gRPC status
    generation     admit (request: validate, tokenize; semantic: pick the pool), then plan
                   each attempt (index: prefix match → routing/policies: decide)
    stream         Decode on the chosen worker; retry before the first token
    replies        detokenizer + stop_strings → text chunks, TTFT / ITL

State the decisions read, each owned by one module: registry_view (live workers and
loads from Redis, as immutable snapshots), index + kv_follower (which worker holds which
blocks, fed by the workers' KV events), tracker (what this router has in flight).
The public API's messages are dataclasses in api, converted only by api_proto (used by
the servicer and the client alike). Wiring: server (one RouterServer per process); CLI:
``python -m router``; a small blocking client for scripts and ``pdserve chat``: client.
Torch-free, except the semantic router's embedding model, imported lazily and only when
routes are configured.
"""
