PY := .venv/bin/python
# recipes run as in an activated venv: its tools (ninja among them) come first on PATH for
# the tests, the Ray workers they start and the jobs
export PATH := $(CURDIR)/.venv/bin:$(PATH)
PIP := .venv/bin/pip
STAMP := .venv/.installed

LOCK := requirements/lock.txt
DEV_LOCK := requirements/dev-lock.txt
COMPILE := DS_BUILD_OPS=0 .venv/bin/pip-compile --quiet --strip-extras --no-emit-index-url \
	--no-emit-find-links --constraint requirements/pins.txt

.PHONY: setup test test-default test-cluster browser lint format demo bench gpu-check lock clean

setup: $(STAMP)

# the pinned versions of requirements/dev-lock.txt (torch: the CPU wheel on disk, never a CUDA
# download), then the project itself without resolving anything again
$(STAMP): pyproject.toml $(LOCK) $(DEV_LOCK)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -U pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -r $(DEV_LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@echo "building DeepSpeed's CPU shared-memory op once (~30 s; ~/.cache/torch_extensions)"
	-$(PY) -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; \
		ShareMemCommBuilder().load(verbose=False)"
	@echo "building gazeattn's CPU decode kernel once (~40 s; ~/.cache/torch_extensions)"
	-$(PY) -c "from gazeattn.ops.gaze.cpu_kernel import cpu_kernel; \
		assert cpu_kernel() is not None, 'not built: the torch path serves'"
	touch $(STAMP)

# recompute the lock files from pyproject.toml: a new or changed dependency gets pinned, the
# others keep their pins; `make lock UPGRADE=--upgrade` moves every pin to its newest release
lock: setup
	$(COMPILE) $(UPGRADE) --output-file $(LOCK) pyproject.toml
	$(COMPILE) $(UPGRADE) --extra dev --constraint $(LOCK) --output-file $(DEV_LOCK) pyproject.toml
	sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9.]+$$/\1/' $(LOCK) $(DEV_LOCK)

# the default suite, then the two-node Ray cluster tests (marker `cluster`, about 8 minutes)
test: test-default test-cluster

# two pytest-xdist workers: the tests that start a Ray (marker `ray`) run one at a time on one,
# the others (kernels, models, packaging) beside them on the other
test-default: setup browser
	$(PY) -m pytest -m "not cluster" -n 2 --dist loadgroup $(PYTEST_ARGS)

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

# the prepared GPU run (bench/gpu_check.py, more than 10 minutes on an H200): the gpu tests, the attention
# benchmark and a 3B-shaped model; runs with the machine's own Python when there is no .venv
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(PY)),$(PY),python3) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf .venv build *.egg-info
