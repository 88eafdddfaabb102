# The two commands of the README. Each does its own set-up from a clean clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Install twinflow (core only) and run the whole pipeline on the embedded defaults.
demo: $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/twinflow demo

# Install twinflow with the test tools, start PostgreSQL for the scale-out test, run every test that
# this machine can run: the quick tier and the `slow` integration tier (demo, serve/deploy, real
# MLflow server, scale-out on separate Prefect/Dask/MLflow+PostgreSQL processes, the UIs in headless Chromium). GPU tests run
# wherever CuPy and a GPU are present and skip cleanly elsewhere.
test: $(BIN)/python
	# -c: the S3 stack pinned to a set that resolves (boto3 and aiobotocore both pin botocore).
	$(BIN)/python -m pip install -q -e '.[dev]' -c .ci/constraints.txt
	# The CPU build of PyTorch (a local wheel on these machines) for the sequence-model tests.
	$(BIN)/python -m pip install -q 'torch==2.13.0' || echo 'torch unavailable: sequence-model tests will skip'
	# mosquitto (Debian) for the stream bridge's MQTT tests; they start their own on a loopback port.
	command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
		{ apt-get update -qq && apt-get install -y -qq mosquitto; } || echo 'mosquitto unavailable: MQTT tests will skip'
	# Headless Chromium (Debian package) for the browser test of the MLflow and Prefect UIs.
	command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; } \
		|| echo 'chromium unavailable: the browser test will skip'
	eval "$$(bash .ci/postgres.sh)" && $(BIN)/python -m pytest -m ''  # '' = no marker filter: every tier
