# culturemert: the two set-up commands of the README are `make quickstart` and `make test`.
# Both create .venv on first use (torch 2.13.0 CPU first, then the package) and are safe to re-run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install system-deps quickstart test soak bench gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[corpus,test]'
	touch $@

install: $(VENV)/.installed

# Debian's FluidSynth + General-MIDI soundfont make the corpus sound like instruments; without root or apt
# the corpus falls back to pretty_midi's bundled soundfont or a pure-numpy synthesiser (see docs/corpus.md).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! [ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ]; then \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends fluidsynth fluid-soundfont-gm) \
	  || echo "note: could not install fluidsynth; the corpus will use a fallback synthesiser"; \
	fi

quickstart: install system-deps
	$(VENV)/bin/culturemert quickstart --out runs/quickstart

test: install
	$(PY) -m pytest -q -m "not soak" tests

soak: install
	$(PY) -m pytest -q -m soak tests

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# Wheels of the dependencies the device machines' image lacks (Python 3.12 there), for bench/gpu_suite.sh.
gpu-wheels:
	rm -rf .wheels
	pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .wheels \
	    --platform any 'pydantic>=2.6,<3' 'soundfile>=0.12,<1' 'soxr>=0.3.7,<2'
	pip download -q --no-deps --only-binary=:all: -d .wheels 'nnAudio>=0.3.3,<0.4'

clean:
	rm -rf $(VENV) runs .pytest_cache
