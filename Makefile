# DynaMix: `make demo` runs the main job on embedded defaults, `make test` runs the test suite.
# Both create .venv and install the pinned dependencies (requirements.lock) on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test test-fast scenarios bench install clean help manifests

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): requirements.lock pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade "pip>=24"
	# one pip command so the resolver sees every pin at once (docs/stack.md)
	$(VPY) -m pip install -q -r requirements.lock
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies

demo: $(STAMP)  ## synthesize SynthReID, ingest it, train + evaluate DynaMix on local Ray
	$(VENV)/bin/dynamix demo --out $(DEMO_DIR)

test: $(STAMP)  ## run the test suite (CPU), without the long scenarios (`make scenarios`): the Ray tier in one worker, the Ray-free tests in the other
	$(VPY) -m pytest -q -m "not slow" -n 2 --durations=30

scenarios: $(STAMP)  ## the long end-to-end scenarios (kill/restart matrices, S3 and cluster variants, every clustering recipe)
	$(VPY) -m pytest -q -m slow --durations=15

test-fast: $(STAMP)  ## the tests that start no Ray and are not long scenarios (a few minutes)
	$(VPY) -m pytest -q -m "not ray and not slow" -n 2 --durations=10

bench: $(STAMP)  ## run every benchmark (each prints its ratio against a reference measured in the same run), then the long scenarios
	$(VPY) benchmarks/run_all.py
	$(VPY) -m pytest -q -m slow --durations=15

manifests: $(STAMP)  ## render the Helm chart into plain manifests under deploy/manifests/
	$(VPY) -c "import helm_python as h, pathlib; out = h.Chart.load('helm/dynamix').render(None, name='dynamix', namespace='dynamix', is_install=True); d = pathlib.Path('deploy/manifests'); d.mkdir(exist_ok=True); [(d / pathlib.Path(k).name).write_text(v) for k, v in out.items() if v.strip()]; print('wrote', sorted(p.name for p in d.iterdir()))"

clean:  ## remove generated runs and caches (keeps .venv)
	rm -rf runs .pytest_cache
