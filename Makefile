# Two entry points (see README): `make demo` runs the offline end-to-end job, `make test` the tests.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU wheel available on these machines; on a GPU box set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	# lmms-eval's own requirements pull torchvision and timm (CUDA builds that break a CPU torch); the plugin and
	# its tests need only the package itself plus these two. GPU boxes install the full `.[eval]` extra instead.
	$(PY) -m pip install --quiet --no-deps "lmms-eval>=0.7,<0.8"
	$(PY) -m pip install --quiet loguru pytz
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) demo_output
