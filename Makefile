# jprobe: `make demo` and `make test` work on a fresh clone (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all install demo test stress bench coverage dense mutation clean

all: install

$(STAMP): pyproject.toml setup.py $(wildcard jprobe/runtime_c/*.c jprobe/runtime_c/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

demo: install
	$(MAKE) -C examples PY=$(abspath $(PY))

test: install
	$(PY) -m pytest -q -n 2 tests

# Probes changed 1,000 times while 8 threads run through them, 1,000 attach sessions on one
# process (tests marked stress).
stress: install
	$(PY) -m pytest -q -m stress tests

bench: install
	$(PY) -m pip install -q -e '.[bench]' || echo "frida not installed: its row is skipped"
	$(PY) benchmarks/bench.py

coverage: install
	$(PY) benchmarks/coverage.py

# Every instruction of python3 probed at once, run (slow: ~10 minutes). BINARIES="..." for others.
dense: install
	$(PY) benchmarks/dense.py $(BINARIES)

# Mutants of trampolines/ and sites.py against the tests in pyproject's [tool.mutmut] (~30 minutes
# on 2 cores; a second run retests only what changed; MUTANTS='jprobe.sites.*' runs those alone).
# Survivors: `$(VENV)/bin/mutmut results`, one of them: `$(VENV)/bin/mutmut show NAME`.
mutation: install
	$(PY) -m pip install -q -e '.[mutation]'
	$(VENV)/bin/mutmut run --max-children $(or $(JOBS),2) $(MUTANTS)
	$(VENV)/bin/mutmut export-cicd-stats
	$(PY) tests/support/mutation_score.py

clean:
	rm -rf $(VENV) build *.egg-info jprobe/runtime_c/*.so examples/build benchmarks/build mutants
