# qlorax: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qlorax-installed

.PHONY: install demo test lint bench lock clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/qlorax verify --runs 3 --threads 1,2 --output-dir runs/demo --force

test: install
	bash scripts/install_test_services.sh
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: install
	$(VENV)/bin/ruff check src tests bench

bench: install
	$(PY) bench/bench_train.py
	$(PY) bench/bench_verify.py
	$(PY) bench/bench_analyze.py

# Regenerate the lock file from a fresh environment (run after changing pyproject.toml).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -e '.[ray,dev]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^qlorax' > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf runs .pytest_cache
