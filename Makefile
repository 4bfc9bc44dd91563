# Two commands do everything on a fresh machine with Python 3.11 and pip:
#   make demo   set up, then run the main job (a short StratOpt training run)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stratopt-installed

.PHONY: setup demo test clean
setup: $(STAMP)

# torch first and only if the venv has none, so an installed (e.g. CUDA) torch is never
# replaced; then everything else with torch pinned to whatever is installed (requirements.txt:
# the tested versions of ".[all]"), then this package, editable, with its console scripts.
$(STAMP): pyproject.toml setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PIP) install -q setuptools wheel -c $(VENV)/torch-constraint.txt
	$(PIP) install -q --no-build-isolation -c $(VENV)/torch-constraint.txt -r requirements.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The main job: StratOpt under the deepspeed launcher, ZeRO-2, 2 CPU ranks, offline.
# On GPUs: python -m stratopt_ds.data build fineweb --tokenizer gpt2 --max-tokens 1100000000 \
#              --out stores/fineweb-gpt2-1.1B
#          deepspeed --num_gpus 8 --module stratopt_ds.train --preset 134m --device cuda \
#              --data stores/fineweb-gpt2-1.1B --deepspeed_config ds_configs/134m_zero2.json \
#              --steps 2000 --batch-size 512
# The venv's bin/ first on PATH, as in the tests: its ninja builds DeepSpeed's CPU comm op (two
# ninja versions on one build directory rebuild each other's work; docs/NATIVE_OPS.md).
demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 --module stratopt_ds.train \
	  --deepspeed_config ds_configs/tiny_zero2_cpu.json --data synthetic --steps 60 --batch-size 16 \
	  --out runs/demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs build *.egg-info
