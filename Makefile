PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: setup test test-default test-cluster browser lint format demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -U pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# the default suite, then the two-node Ray cluster tests (marker `cluster`, about 8 minutes)
test: test-default test-cluster

test-default: setup browser
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

test-cluster: setup
	$(PY) -m pytest -m cluster $(PYTEST_ARGS)

# headless Chromium for the MLflow UI test (Debian's package; the test skips with a reason without it)
browser:
	-command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

demo: setup
	$(PY) jobs/demo.py

bench: setup
	$(PY) bench/attention.py
	$(PY) bench/attention_gpu.py
	$(PY) bench/decode_model.py

# the prepared GPU run (bench/gpu_check.py, about 8 minutes): the gpu tests, the attention
# benchmark and a 3B-shaped model; runs with the machine's own Python when there is no .venv
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(PY)),$(PY),python3) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf .venv build *.egg-info
