# penwatch — the two commands are `make demo` and `make test`; both install the
# package with every extra and the dev tools (.[all,dev]) into $(VENV) once per pyproject change.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.penwatch-installed

.PHONY: demo test lint format bench system-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

# Debian packages the integration tests drive for real (Prometheus, Alertmanager,
# Pushgateway, Chromium, docker-compose for config validation). Installed only when
# running as root; otherwise the tests that need them say so loudly.
SYSTEM_PKGS := prometheus prometheus-alertmanager prometheus-pushgateway chromium docker-compose
system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "system-deps: not root; tests needing $(SYSTEM_PKGS) will report what is missing"; fi

# The numerical tests (marked `parallel`: no wall-clock assertions, processes or servers)
# run on two workers; the files marked `concurrent` (examples, the demo, the wheel, the
# browser: subprocesses awaited, nothing timed) two files at a time; everything else that
# times, serves or spawns runs alone afterwards.
test: $(STAMP) system-deps
	$(PY) -m pytest -q -m parallel -n 2
	$(PY) -m pytest -q -m concurrent -n 2 --dist loadfile --no-loadscope-reorder
	$(PY) -m pytest -q -m "not parallel and not concurrent"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# PENWATCH_BENCH_QUICK=1 make bench: a quick run (few repeats, small scaling sweeps, plots
# in bench-results/); the full run redraws docs/img/scaling_*.png.
bench: $(STAMP)
	$(PY) -m benchmarks

demo: $(STAMP)
	$(VENV)/bin/penwatch demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .jax-cache build *.egg-info
