# Two entry points: `make demo` (train the demo on embedded photos) and `make test`.
# Both create or reuse a local virtual environment in $(VENV), pinned by the constraints file.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= requirements/constraints-cpu.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mambacsr-installed

.PHONY: demo test env bench clean-venv

$(STAMP): setup.py $(CONSTRAINTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade -c $(CONSTRAINTS) pip setuptools wheel
	# torch first: basicsr's sdist imports torch in its setup.py
	$(PIP) install --quiet -c $(CONSTRAINTS) torch torchvision numpy
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-build-isolation basicsr
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# demo: photos bundled with scikit-image -> datasets/skimage_demo/ (idempotent), then a few CPU minutes of
# training. OMP_WAIT_POLICY=PASSIVE stops idle OpenMP threads (torch, numba) from spinning on busy CPUs.
demo: $(STAMP)
	$(PY) -m mambacsr_arch.data.demo_photos
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/basicsr train -opt options/demo_mambacsr_x4.yml

test: $(STAMP)
	$(PY) -m pytest -q tests

env: $(STAMP)
	$(VENV)/bin/basicsr env

bench: $(STAMP)
	$(PY) benchmarks/bench_scan.py

clean-venv:
	rm -rf $(VENV)
