"""Benchmarks for pdserve; `benchmarks.loadgen` is the end-to-end load generator."""
