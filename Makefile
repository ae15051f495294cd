PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of torch this machine ships; a bare `pip install torch` pulls GBs of CUDA.
TORCH = torch==2.13.0

.PHONY: build-deps install install-test test demo bench clean

build-deps:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q pybind11 cmake setuptools wheel

install: build-deps
	$(PIP) install -q --no-build-isolation -e .

install-test: build-deps
	$(PIP) install -q --no-build-isolation -e ".[test]"
	# zennit requires torchvision, which cannot load against the CPU-only torch here;
	# the tests give zennit a stand-in (tests/_peers.py).
	$(PIP) install -q --no-deps "zennit>=0.5"
	# pytorch-grad-cam likewise (its torchvision imports get a stand-in); it needs OpenCV and ttach.
	$(PIP) install -q --no-deps "grad-cam==1.5.7" opencv-python-headless ttach

test: install-test
	$(PYTHON) -m pytest -q -ra

demo: install
	cnnviz demo --out demo_out

bench: install-test
	for b in benchmarks/bench_*.py; do $(PYTHON) $$b || exit 1; done

clean:
	rm -rf build *.egg-info cnnviz_fast/_C*.so demo_out
