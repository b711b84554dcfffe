# Every target sets itself up: it creates .venv if needed and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-train-dev
export PYTHONHASHSEED ?= 0
# Python writes its bytecode caches even where the environment says not to (some containers export
# PYTHONDONTWRITEBYTECODE): without them every test worker and every process a test starts compiled
# the package and pytest rewrote every test module again (collection alone: 6.8 s of CPU per worker
# against 4.5 s with the cache; docs/test_durations.md)
unexport PYTHONDONTWRITEBYTECODE
# pytest-xdist workers of the test targets: one more than the cores this process may use. Many
# tests wait on processes they start (the kill / resume runs, the audit's model conversion, Ray,
# the mirrored trial), so a worker per core leaves cores idle: on 2 cores, 3 workers ran the suite
# in 4:07 and 4:15, 2 in 4:54 and 4:56, 4 in 4:41 (docs/test_durations.md)
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) + 1)" 2>/dev/null || echo auto)

.PHONY: demo test test-all test-slow bench clean setup browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[train,dev,serve]"
	touch $(STAMP)

setup: $(STAMP)

# the tests also exercise the optional Ray, s3:// and HTTP-serving paths
STAMP_ALL := $(VENV)/.installed-all
$(STAMP_ALL): $(STAMP) setup.cfg
	$(PY) -m pip install --quiet -e ".[train,dev,distributed,serve-ray]"
	touch $(STAMP_ALL)

## make test: the fast suite (tiny models and images built in code), on every core (pytest-xdist);
## the 40 slowest tests are listed at the end (their record: docs/test_durations.md).
## --dist loadscope: a module's tests run on one worker from start to end, so a module-scoped
## fixture (a trained run, a Ray instance) is built once, not on both workers or again after
## another module's test came between (with `load` it was: test_halving's runs were built twice)
test: $(STAMP_ALL)
	$(PY) -m pytest -m "not slow and not gpu" -q -n $(TEST_WORKERS) --dist loadscope --durations=40

# headless Debian chromium (+ its driver for Selenium) renders the HTML report and drives the
# serve page in slow tests (skipped without them)
browser:
	@(command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1) || \
	  (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) || \
	  echo "note: chromium could not be installed; the report and serve page browser tests will be skipped"

## make test-slow: the heavy tests (every backbone round trip, report rendering, ...)
test-slow: $(STAMP_ALL) browser
	$(PY) -m pytest -m "slow and not gpu" -q

## make test-all: everything that can run here (gpu tests skip themselves without a GPU)
test-all: $(STAMP_ALL) browser
	$(PY) -m pytest -q

## make demo: the main job end to end on the embedded digits data, offline
demo: $(STAMP)
	bash scripts/demo.sh

## make bench: latency / throughput benchmarks (results go in docs/benchmarks.md)
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo build dist src/*.egg-info .pytest_cache
