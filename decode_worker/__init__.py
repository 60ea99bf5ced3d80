"""pdserve decode worker: serves ``DecodeWorker.Decode``, disaggregated or colocated.

Modules: ``decode`` (a request's lifecycle: prealloc → transfer → running),
``admission`` (the prealloc queue), ``prefill_client`` (the Prefill RPC), ``job`` (what
the servicer hands the lifecycle), ``service`` (proto translation), ``stats`` (metrics),
``worker`` (process wiring), ``__main__`` (command line).
"""
