# make test : create .venv, install memformer (CPU torch 2.13) and run the test suite
# make demo : long-document QA on the embedded default backbone and Python's own documentation
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.memformer-installed

.PHONY: setup test test-fast demo passkey bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch that lies on disk; a bare `torch` could pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# the versions the suite last passed with (constraints.txt); setup.py holds the accepted ranges;
	# `scale` (Ray, Lance) so the suite runs the distributed build and Lance store tests too
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,scale]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -ra tests
	# Triton kernels against the torch reference in Triton's CPU interpreter (set before Python starts)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra tests/test_triton_kernels.py

test-fast: setup
	$(PY) -m pytest -q -ra -m "not integration" tests

demo: setup
	$(VENV)/bin/memformer qa --demo --compare

passkey: setup
	$(VENV)/bin/memformer eval passkey --lengths 4k,16k,32k --trials 10 --out runs/passkey

bench: setup
	$(PY) benchmarks/ingest.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
