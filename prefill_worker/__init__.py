"""pdserve prefill worker: serves ``PrefillWorker.Prefill`` and sends the KV it computes.

Modules: ``prefill`` (a request's lifecycle: bootstrap → waiting → in flight), ``sends``
(KV sends started from inside the engine step, layer-wise or whole), ``service`` (proto
translation, through :mod:`messages.prefill_proto`), ``stats`` (metrics), ``worker`` (the
app the runtime serves), ``wiring`` (builds it from a config: the one place collaborators
are chosen), ``__main__`` (command line).
"""
