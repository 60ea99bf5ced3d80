"""End-to-end load generator behind ``pdserve bench`` (see benchmarks/README.md).

A product command, so a package ``deploy.cli`` may import (``benchmarks/`` are scripts
that nothing imports). One noun per module:

    workload    seeded synthetic sessions (fixed, sharegpt, shared_prefix, multi_turn, mixed_long)
    record      what the client measured of one request
    targets     the servers a run drives: pdserve's gRPC API, OpenAI-compatible HTTP
    driver      open / closed loop, bounded in count and time, progress bar
    summary     latency distributions, throughput, goodput under SLOs, hit ratio
    oracle      the best prefix-cache hit ratio a workload allows
    experiment  one run: workload × load × target → JSON-ready result
    stack       local serving stacks (redis + workers + router; `transformers serve`)
    suite       the comparisons (disagg vs colocated, routing policies, peer)
    report      Markdown tables and matplotlib plots
    machine     where the numbers came from (versions, CPU, load)
    cli         the ``pdserve bench`` subcommands
"""
