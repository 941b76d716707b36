# `make demo` and `make test` work on a fresh clone: each creates .venv and installs the project if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-digits bench-real fashion-data lint install

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,clip,real]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cil.demo

# the import contract (setup.cfg [importlinter]) is checked on a copy laid out as installed: strategies/ and streams/
# inside cil/
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf build/lint && mkdir -p build/lint && cp -r cil build/lint/cil && cp -r strategies build/lint/cil/strategies \
	  && cp -r streams build/lint/cil/streams
	cd build/lint && PYTHONPATH=. ../../$(VENV)/bin/lint-imports --config ../../setup.cfg --no-cache

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	@for b in benchmarks/[!_]*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) $$b || exit 1; done

bench-digits: $(STAMP)
	$(PY) benchmarks/digits_table.py --readme

# Fashion-MNIST from Debian's dataset-fashion-mnist (installed here when missing and run as root)
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-data:
	@test -f $(FASHION) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu), or give the IDX folder with --data-root to benchmarks/peers.py and benchmarks/real_table.py"; exit 1; fi; }

# the peer comparison against Avalanche and the headline real-data table (about 1 h on 2 cores); both rewrite README.md
bench-real: $(STAMP) fashion-data
	$(PY) benchmarks/peers.py --readme
	$(PY) benchmarks/real_table.py --readme
