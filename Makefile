PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of torch this machine ships; a bare `pip install torch` pulls GBs of CUDA.
TORCH = torch==2.13.0

# Stamps (under build/, git-ignored) make a second `make demo` / `make test` skip the pip
# install and the C++ build while the package metadata and the C++ sources are unchanged.
STAMPS = build/stamps
BUILD_INPUTS = setup.py pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
# A stamp whose extension has been deleted since is stale.
ifeq ($(wildcard cnnviz_fast/_C*.so),)
$(shell rm -f $(STAMPS)/install $(STAMPS)/install-test)
endif

.PHONY: build-deps install install-test test demo bench clean

build-deps: $(STAMPS)/build-deps
install: $(STAMPS)/install
install-test: $(STAMPS)/install-test

$(STAMPS)/build-deps:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PYTHON) -c "import pybind11, cmake, setuptools, wheel" 2>/dev/null || $(PIP) install -q pybind11 cmake setuptools wheel
	@mkdir -p $(@D) && touch $@

$(STAMPS)/install: $(STAMPS)/build-deps $(BUILD_INPUTS)
	$(PIP) install -q --no-build-isolation -e .
	@mkdir -p $(@D) && touch $@

$(STAMPS)/install-test: $(STAMPS)/build-deps $(BUILD_INPUTS)
	$(PIP) install -q --no-build-isolation -e ".[test]"
	# zennit requires torchvision, which cannot load against the CPU-only torch here;
	# the tests give zennit a stand-in (tests/_peers.py).
	$(PIP) install -q --no-deps "zennit>=0.5"
	# Quantus (the metrics' peer) pulls OpenCV and TensorFlow helpers the tests do not use.
	$(PIP) install -q --no-deps "quantus==0.6.0"
	# torch-lucent requires torchvision and kornia too; the tests give it stand-ins (tests/_peers.py).
	$(PIP) install -q --no-deps "torch-lucent==0.1.8"
	# pytorch-grad-cam likewise (its torchvision imports get a stand-in); it needs OpenCV and ttach.
	$(PIP) install -q --no-deps "grad-cam==1.5.7" opencv-python-headless ttach
	@mkdir -p $(@D) && touch $@

test: install-test
	$(PYTHON) -m pytest -q -ra

demo: install
	cnnviz demo --out demo_out

bench: install-test
	for b in benchmarks/bench_*.py; do $(PYTHON) $$b || exit 1; done

clean:
	rm -rf build *.egg-info cnnviz_fast/_C*.so demo_out
