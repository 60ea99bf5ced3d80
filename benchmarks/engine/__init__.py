"""Engine throughput: pdserve's engine against vLLM's CPU build, side by side.

What is measured (same machine, same converted checkpoint directory, same prompts as token
ids, greedy, ignore-EOS, the same threads and KV cache size, an engine per process):

* ``batch1``  one request at a time: a 128-token prompt, 64 new tokens, repeated (median).
  Before each repeat a 1-token run on another prompt of the same length gives TTFT, and
  TPOT = (wall_64 - TTFT) / 63 is the per-token decode time the roofline bounds.
* ``mixed``   32 requests submitted together; prompt lengths uniform in [32, 512], output
  lengths uniform in [16, 128] (seeded), run once per system.
* ``decode``  64 requests of a 64-token prompt and 128 new tokens (decode-heavy).

Every workload runs in each dtype of ``--dtypes`` (default fp32 and bf16), passed
explicitly to every system (our engine's default may be ``auto``).

Systems (``--systems``, default ``ours,vllm``), each in its own process
(:mod:`benchmarks.engine.child`): ``ours`` is ``engine.LLM`` (its public API, explicit
dtype); ``vllm`` is vLLM's offline ``LLM``, run with the peer venv's Python
(``make bench-peers`` installs it; ``loadgen.peers``), engine core in-process, OpenMP
threads bound to the first ``--threads`` CPUs, ``VLLM_CPU_KVCACHE_SPACE`` = our
``kv_cache_gib``. Without the peer the run says so on one line and measures ours alone.
``hf``, ``hf_static`` (static batches) and ``hf_cb`` (transformers' continuous batching)
are opt-in baselines (``--systems ours,hf``).

Every prompt is drawn from a seeded RNG over the vocabulary minus special tokens and is
used once per system (warm-up and TTFT runs use their own prompts), so no system gets
prefix-cache hits (the JSON records ``cached_tokens``; a warning names any). The child
checks that every request got exactly the tokens it asked for. ``greedy match`` is the
share of requests whose tokens equal the reference system's (vLLM, else ``hf``) in the
same dtype: fp32 should be 100 %; bf16 rounding legitimately diverges after some tokens.

Reading the table: ``tok/s`` = output tokens / wall seconds (prompt tokens not counted);
``TPOT`` for batch1 as above, for the batched workloads wall / tokens per request (the mean
gap between a request's tokens while the whole batch runs); ``peak RSS`` is the system
process's ``ru_maxrss`` over its whole run; ``ours x`` = our tok/s over that row's, so > 1
means we are faster. Goals (issue 14; PASS / MISS, n/a when a side was not measured):
ours/vLLM >= 1.2x in bf16 and >= 1.0x in fp32 on every workload, batch-1 bf16 TPOT >= 70 %
of the roofline, vLLM's peak RSS >= ours.

The roofline gives the lower bound on batch-1 decode time per token in each dtype: weight
bytes in that dtype (tied embeddings counted once) / memory bandwidth, the better of a
tensor copy (read + write bytes) and a read (a sum), best of 5 each, measured once.

Timings on a shared machine are noisy: the script warns when the load average is high and
the JSON records it. Results: ``benchmarks/results/engine_throughput.json`` (``_quick``
suffix, or ``--out``).

Run: ``make bench`` or ``python -m benchmarks.engine [--quick] [--threads 2]
[--dtypes float32,bfloat16] [--systems ours,vllm] [--kv-cache-gib 1] [--out PATH]
[--engine-arg max_num_batched_tokens=512]``. Exit status 1 if any system failed.

Modules: ``workloads`` (prompts and the plan), ``spec`` (what a system's process is
told), ``systems`` (ours and the HF baselines behind one protocol), ``peer_vllm`` (vLLM
behind it), ``child`` (one system's process: warm-up, timing, length checks, peak RSS),
``runner`` (starting a child, its measurements, token agreement), ``roofline``
(bandwidth and the per-dtype bound), ``report`` (table, roofline and goals),
``__main__`` (the CLI).
"""
