# The two set-up commands of the README: `make demo` and `make test`. Everything installs from here.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# torchvision, timm and onnx live in their own side environment, never in .venv (the package does not
# depend on them; they are the extras swav[torchvision], swav[timm] and swav[onnx]): the tests that load
# our exports into the real libraries and train their backbones run there (tests/test_torchvision_interop.py
# and tests/sideenv/ through tests/test_side_env.py). The project is installed there too (editable).
TV_VENV  ?= .venv-torchvision
TV_PINS  ?= torch==2.14.1 torchvision==0.29.1 safetensors==0.8.0 timm==1.0.31 onnx==1.23.2 onnxscript==0.7.2 \
            onnxruntime==1.32.0 pytest==9.2.0 matplotlib==3.11.2 scikit-learn==1.9.1
TV_STAMP := $(TV_VENV)/.installed-stamp

.PHONY: install test demo data fuzz clean interop-env

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,report]"
	@touch $(STAMP)

# The side env is optional for `make test`: without it (no network or pip cache) the interop test
# skips, or fails where SWAV_REQUIRE_TORCHVISION=1 (as .ci/run sets).
test: install
	@$(MAKE) --no-print-directory interop-env TV_STRICT=0
	$(PY) -m pytest -q

# Build $(TV_VENV) once (several GB, about a minute from pip's cache); rebuilt when TV_PINS change.
TV_STRICT ?= 1
interop-env:
	@if [ "$$(cat $(TV_STAMP) 2>/dev/null)" = "$(TV_PINS)" ]; then \
	  echo "$(TV_VENV) is ready ($(TV_PINS))"; \
	else \
	  echo "building $(TV_VENV) with $(TV_PINS) (for the interop and side-env tests; never in $(VENV))"; \
	  if rm -rf $(TV_VENV) && $(PYTHON) -m venv $(TV_VENV) && $(TV_VENV)/bin/python -m pip install -q $(TV_PINS) \
	     && $(TV_VENV)/bin/python -m pip install -q -e .; then \
	    echo "$(TV_PINS)" > $(TV_STAMP); \
	  else \
	    rm -rf $(TV_VENV); \
	    echo "WARNING: could not build $(TV_VENV) (no network or pip cache?); tests/test_torchvision_interop.py" \
	         "will be skipped (it fails where SWAV_REQUIRE_TORCHVISION=1). Build it later with: make interop-env" >&2; \
	    exit $$(( $(TV_STRICT) ? 1 : 0 )); \
	  fi; \
	fi

# Fashion-MNIST from Debian's dataset-fashion-mnist where apt can install it; otherwise `swav`
# downloads it (with checksums) or says how to get it.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST found in /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
	  && echo "installed Debian's dataset-fashion-mnist" || echo "apt could not install dataset-fashion-mnist; swav will try to download it"; \
	else echo "not root: swav will look in \$$SWAV_DATA and ~/.cache/swav, or download Fashion-MNIST"; fi

demo: install data
	$(VENV)/bin/swav pretrain

# Fuzz the image decoder (5 minutes; FUZZ_ARGS="--n 50000 --seed 1" for a fixed count)
fuzz: install
	OMP_NUM_THREADS=1 $(PY) bench/fuzz_decode.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) $(TV_VENV) build dist src/*.egg-info
