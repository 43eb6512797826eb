# The two set-up commands of the README: `make demo` and `make test`. Everything installs from here.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test demo data fuzz clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,report]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

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
	rm -rf $(VENV) build dist src/*.egg-info
