VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fxopt-installed

.PHONY: setup browser test test-slow demo clean

setup: $(STAMP)

# torch==2.13.0 first: the CPU wheel lies on this machine's disk, while a
# looser requirement would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

# The HTML report's test renders it in headless Chromium. Best effort: install it from Debian's packages when it
# is missing and apt-get can (as root); otherwise that test skips with a message. Never fails the build.
browser:
	-@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "note: chromium is not installed; the HTML report's browser test will be skipped"

# --max-worker-restart=0: a worker that dies in native code (an abort) fails the run at once; restarted
# workers were seen to leave a loadfile run idle for good.
test: setup browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider --durations=30 -n 2 --dist loadfile --max-worker-restart=0

test-slow: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HYPOTHESIS_PROFILE=slow $(PY) -m pytest -q -m slow

demo: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m fxopt.demo

clean:
	rm -rf $(VENV) build *.egg-info
