# Two entry points: `make demo` (train the demo on embedded photos) and `make test`.
# Both create or reuse a local virtual environment in $(VENV), pinned by the constraints file.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= requirements/constraints-cpu.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mambacsr-installed

.PHONY: demo test env bench gpu-wheels clean-venv

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

# gpu-wheels: what benchmarks/gpu_check.py needs on an offline GPU machine that has torch + triton but
# not our pure-Python dependencies. Run here (with internet); copy wheels/ to the GPU machine's checkout.
# basicsr has no wheel on PyPI: it is built here (pure Python; torch must be importable, hence the venv).
GPU_PYTHON ?= 3.12
GPU_PLATFORM ?= manylinux2014_x86_64
gpu-wheels: $(STAMP)
	mkdir -p wheels
	$(PIP) wheel --quiet --no-deps --no-build-isolation -c $(CONSTRAINTS) -w wheels basicsr
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--platform $(GPU_PLATFORM) -c $(CONSTRAINTS) -d wheels addict lmdb yapf future
	ls wheels

clean-venv:
	rm -rf $(VENV)
