"""pdserve prefill worker: serves ``PrefillWorker.Prefill`` and sends the KV it computes.

Modules: ``prefill`` (a request's lifecycle: bootstrap → waiting → in flight), ``sends``
(KV sends started from inside the engine step, layer-wise or whole), ``service`` (proto
translation), ``stats`` (metrics), ``worker`` (process wiring), ``__main__`` (command line).
"""
