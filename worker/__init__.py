"""The worker process around a role's app, the same for prefill, decode and colocated
workers.

=================  =====================================================================
module             owns
=================  =====================================================================
``runtime``        :class:`WorkerRuntime` and :func:`run_worker`: gRPC server, /metrics,
                   registry heartbeat, KV event publishing, the ready line, signals, drain
``app``            :class:`WorkerApp`: what a role hands the runtime
``control``        the ``WorkerControl.GetStatus`` servicer
``snapshot``       :class:`WorkerSnapshot`: an app's load right now
``latency``        :class:`LatencyWindow`: recent TTFT / ITL behind the load reports
``config``         :class:`WorkerConfig`: YAML and flags of one worker process
``heartbeat``      :class:`Heartbeat`: the worker's registration in Redis
=================  =====================================================================

Torch-free: the engine lives behind the app, built by each role's ``wiring`` module.
"""
