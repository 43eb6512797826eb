# The two set-up commands of the README: `make demo` and `make test`. Everything installs from here.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test demo data clean

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

clean:
	rm -rf $(VENV) build dist src/*.egg-info
