# Two entry points: `make run` (pipeline on the embedded demo) and `make test`.
# Both create .venv with the pinned dependency set first (once; redone when the pins change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv run run-3d test test-fast coverage flow browser clean-venv

venv: $(STAMP)

# On a GPU host: `make venv CUDA=1` adds the pins of the CUDA build's runtime (requirements-cuda.lock).
CUDA ?=

$(STAMP): requirements.lock pyproject.toml $(if $(CUDA),requirements-cuda.lock)
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock $(if $(CUDA),-r requirements-cuda.lock)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

run: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show

# The 3-D demo (MNI152 sub-volumes, 32^3 voxels) as a DVC experiment beside the 2-D run, which it leaves
# in place (--temp): about 20 min on 2 CPU cores. See docs/volumes.md.
run-3d: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run --temp -n demo-3d -S ingest.dims=3 -S ingest.resolution=32 \
		-S 'train_vae.model.block_out_channels=[16,32]' -S train_vae.batch_size=8 -S train_vae.steps=400 \
		-S train_ldm.prediction_type=v_prediction -S train_ldm.sample_posterior=false
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp show --only-changed

flow: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m flows.pipeline

# One pytest worker per core and one more (a test often waits: on a subprocess's imports, a server, a queue
# poll), one torch thread each (tests/conftest.py); the 15 slowest tests in every log.
WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
PYTEST  := PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(WORKERS) --maxschedchunk 1 --durations=15

test: venv browser
	$(PYTEST)

# The edit-test loop: unit tests only (no DAG, no Prefect server, no killed processes).
test-fast: venv
	$(PYTEST) -m "not e2e and not slow"

# Statement coverage of synthmed/, stages/ and flows/, stages run by DVC and Prefect included (pyproject.toml).
coverage: venv browser
	rm -f .coverage .coverage.*
	COVERAGE_FILE="$(CURDIR)/.coverage" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m coverage run -m pytest -q \
		-n $(WORKERS) --maxschedchunk 1 -p no:cacheprovider
	$(BIN)/python -m coverage combine -q && $(BIN)/python -m coverage report --skip-covered

# Debian's Chromium, for the test that opens the run report in a real headless browser. Installed where
# apt-get runs as root (CI); elsewhere that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } } || \
		echo "note: no chromium; the headless-browser report test will be skipped"

clean-venv:
	rm -rf $(VENV)
