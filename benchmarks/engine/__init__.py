"""Engine throughput: pdserve's engine against three Hugging Face baselines, in one run.

What is measured (same machine, same torch threads, same prompts, greedy, ignore-EOS):

* ``batch1``  one request at a time: a 128-token prompt, 64 new tokens, repeated (median).
  Besides the 64-token run, each repeat times a 1-token run on another prompt of the same
  length: that is TTFT, and TPOT = (wall_64 - TTFT) / 63 is the per-token decode time that
  the roofline bounds.
* ``mixed``   32 requests submitted together; prompt lengths uniform in [32, 512], output
  lengths uniform in [16, 128] (seeded), run once per system.

Systems:

* ``hf``         ``model.generate`` one request at a time.
* ``hf_static``  ``model.generate`` on static batches (``--static-batch-size``, in arrival
  order), left padded with an attention mask; a batch runs until its longest request is
  done, so only the tokens each request asked for count as useful output.
* ``hf_cb``      transformers' continuous batching. By default it drives the
  ``ContinuousBatchingManager`` that ``generate_batch`` uses, opened once (like our
  ``LLM``) and fed with per-request ``max_new_tokens`` via ``add_request``.
  ``--cb-api generate_batch`` calls ``model.generate_batch`` instead: that API takes one
  ``max_new_tokens`` for all requests (we use the max and count useful tokens only) and
  builds, warms up and tears down its manager and KV cache inside every call.
* ``ours``       ``engine.LLM.generate`` with one ``SamplingParams`` per request.

Every prompt is drawn from a seeded RNG over the vocabulary minus special tokens and is
used once per system (warm-up and TTFT runs use their own prompts), so no system gets
prefix-cache hits; ``cached_tokens`` reported by our engine is checked to stay 0.
Ignoring EOS: HF runs with the model's ``eos_token_id`` cleared (EOS may be generated but
does not stop), continuous batching with ``eos_token_id=-1``, ours with
``ignore_eos=True``. The harness checks that every request got exactly the tokens it asked
for, and reports how often each system's greedy output equals the ``hf`` reference
(batched fp32 math may legitimately drift after some tokens; a low match rate for ours
is a bug signal, not a speed result).

Reading the table: ``tok/s`` = useful output tokens / wall seconds (prompt tokens are not
counted); ``ours x`` = our tok/s divided by that row's tok/s on the same workload, so > 1
means we are faster. The goals (PASS/MISS) are: batch1 ours/hf >= 1.0; mixed
ours/hf_static >= 1.5 and ours/hf_cb >= 2.0. ``decoded tok`` > ``useful tok`` is wasted
work (static batches decoding past a request's end); ``match hf`` is the share of requests
whose tokens equal the ``hf`` reference exactly.

The roofline line gives the lower bound on batch-1 decode time per token: weight bytes
(tied embeddings counted once) / memory bandwidth, the better of a 512 MiB tensor copy
(read + write bytes) and a 512 MiB read (a sum), best of 5 each; decode only reads weights,
so the faster figure keeps the bound a bound. It also prints what fraction of that bound
each system's TPOT reaches (100 % = memory-bound ideal).

Timings on a shared machine are noisy: with all cores in use by torch, one busy core stalls
every parallel region, so a run may take several times longer; the script warns when the
load average is high and the JSON records it. ``--threads 1`` is steadier for development.
Results: ``benchmarks/results/engine_throughput.json`` (``_quick`` suffix, or ``--out``).

Run: ``make bench`` or ``python -m benchmarks.engine [--quick] [--threads N]
[--out PATH] [--skip-ours] [--systems hf,ours] [--cb-api generate_batch]
[--engine-arg max_num_batched_tokens=512]``. Exit status 1 if any system failed.

Modules: ``workloads`` (prompts and the plan), ``systems`` (the four systems behind one
protocol), ``runner`` (timing, length checks, agreement with ``hf``), ``roofline``
(bandwidth and the batch-1 bound), ``report`` (table and goals), ``__main__`` (the CLI).
"""
