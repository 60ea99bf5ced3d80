"""Capacity planning: measure a cost profile, simulate the cluster, search deployments.

``pdserve profile`` (capacity/profile_cli.py) measures the cost model on this machine;
``pdserve simulate`` (capacity/simulate_cli.py) runs the discrete-event simulator of the
router, pools, KV transfer and autoscaling with the real policy code; ``pdserve plan``
(capacity/plan_cli.py) searches pool sizes and autoscaling targets against SLOs.
"""
