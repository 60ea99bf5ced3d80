"""pdserve decode worker: serves ``DecodeWorker.Decode``, disaggregated or colocated.

Modules: ``decode`` (a request's lifecycle: prealloc → transfer → running),
``admission`` (the prealloc queue), ``prefill_client`` (the Prefill call: interface and
gRPC client), ``prefill_fake`` (its in-process fake, for tests), ``service`` (proto
translation, through :mod:`messages.decode_proto`), ``stats`` (metrics), ``worker`` (the
app the runtime serves), ``wiring`` (builds it from a config: the one place collaborators
are chosen), ``__main__`` (command line). The messages of the ``Decode`` call are in
:mod:`messages.decode`.
"""
