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
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

env: $(STAMP)
	$(VENV)/bin/basicsr env

bench: $(STAMP)
	$(PY) benchmarks/bench_scan.py

# gpu-wheels: everything benchmarks/gpu_check.py needs beyond torch (+ triton) on an offline GPU machine whose
# image may be a bare CUDA torch: our dependencies and BasicSR's, as wheels for that machine's Python and
# platform, pinned by $(CONSTRAINTS) where it pins them. Run here (with internet); bring wheels/ to the GPU
# machine's checkout. gpu_check.py installs from it only what is missing there, and says which.
# basicsr has no wheel on PyPI: it is built here (pure Python; torch must be importable, hence the venv).
# Names are distributions (pip's); gpu_check.NEEDED maps import names to them.
GPU_PYTHON ?= 3.12
GPU_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux1_x86_64
GPU_WHEELS ?= addict future yapf platformdirs lmdb pyyaml tqdm safetensors numpy numba llvmlite \
	opencv-python-headless scikit-image scipy pillow imageio tifffile networkx lazy-loader packaging
gpu-wheels: $(STAMP)
	mkdir -p wheels
	$(PIP) wheel --quiet --no-deps --no-build-isolation -c $(CONSTRAINTS) -w wheels basicsr
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -c $(CONSTRAINTS) -d wheels $(GPU_WHEELS)
	ls wheels

clean-venv:
	rm -rf $(VENV)
