# One entry point for the common jobs. `make toy` is the main job; `make test` runs the suite. Every study
# target is `python study.py NAME` (python study.py --help lists them; add --cluster slurm for SLURM).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test toy sweep ablation digits mechanism bridge notebooks bench gpu-check clean-venv

# `make toy SEEDS="0 1 2"` for the multi-seed check; extra train_toy.py flags via TOY_ARGS.
SEEDS ?= 0
TOY_ARGS ?=

setup: $(STAMP)

# Re-install only when requirements.txt changes, so `make setup` is quick when already done.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .  # ditlab, models and diffusion importable anywhere (notebooks)
	@touch $(STAMP)

# The suite on two processes (pytest-xdist), each test file on one of them (module fixtures are built once).
test: setup
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

# The main job: the toy identity study, both variants, CPU preset -> results/toy/.
toy: setup
	$(PYTHON) study.py toy --seeds $(SEEDS) $(TOY_ARGS)

# Where is the LayerNorm gap large? LayerNorm vs none, one factor at a time around the CPU preset, 2 seeds per
# cell -> results/sweep/ (about 80 min on 2 idle cores; a rerun skips finished runs). SWEEP_ARGS="--steps-scale 0.05"
# for a quick end-to-end check.
SWEEP_ARGS ?=
sweep: setup
	$(PYTHON) study.py sweep $(SWEEP_ARGS)

# Every normalization variant on the toy study, 3 seeds by default (about 75 minutes on 2 cores)
# -> results/ablation/summary.md. ABLATION_SEEDS="0" for one seed; more flags via ABLATION_ARGS. On images: `make digits`.
ABLATION_SEEDS ?= 0 1 2
ABLATION_ARGS ?=
ablation: setup
	$(PYTHON) study.py ablation --seeds $(ABLATION_SEEDS) $(ABLATION_ARGS)

# Does a normalization variant change trained image quality? Every variant of the digits demo at its own best
# lr, 3 seeds, guided and unguided, memorisation and outliers -> results/digits/ (hours on 2 cores; resumable,
# finished runs kept as records: docs/results/digits.md says what the measured study cost). The headline study
# (docs/digits.md, about 12 hours of 2 cores): make digits DIGITS_ARGS='--steps 32000 --cfg-scale 1.5'.
DIGITS_ARGS ?=
digits: setup
	$(PYTHON) study.py digits $(DIGITS_ARGS)

# Why does LayerNorm cost the toy its precision? Localise / ablate / restore / stress cells, 3 seeds each
# -> results/mechanism/ (resumable, finished runs kept as records). MECHANISM_ARGS for more.
MECHANISM_ARGS ?=
mechanism: setup
	$(PYTHON) study.py mechanism $(MECHANISM_ARGS)

# Why does the toy's LayerNorm cost not reach digit images? The digits demo with LayerNorm everywhere, nowhere,
# in the blocks and in the final layer only, probed and edited; the toy at four data spreads; 3 seeds each
# -> results/bridge/ (about 4 hours of 2 cores: toy 1.2 h, digits 2.6 h; resumable from its records). BRIDGE_ARGS for more.
BRIDGE_ARGS ?=
bridge: setup
	$(PYTHON) study.py bridge $(BRIDGE_ARGS)

# Re-execute both notebooks in place, with their figures, on models this repository makes offline: make toy's
# runs and the digits demo with and without LayerNorm (each trained here first if missing: about 6 and 2 x 15
# minutes on 2 cores). TokenEmbeddingsViz adds the official DiT-XL/2 when pretrained_models/ holds it.
notebooks: setup
	test -f results/toy/summary.json || $(MAKE) toy
	test -n "$$(ls -d results/[0-9][0-9][0-9]-DiT-S-4-layer-norm 2>/dev/null)" || $(PYTHON) train.py --demo
	test -n "$$(ls -d results/[0-9][0-9][0-9]-DiT-S-4-none 2>/dev/null)" || $(PYTHON) train.py --demo --normalization none
	$(PYTHON) -m jupyter nbconvert --to notebook --execute --inplace notebooks/ToyDiT_visualization.ipynb \
	    notebooks/TokenEmbeddingsViz.ipynb

# Speed: our DiT vs diffusers' DiTTransformer2DModel (CPU: DiT-S/2, batch 8, fp32; GPU: DiT-XL/2, batch 32)
# -> printed and added to docs/benchmarks.md. More flags via BENCH_ARGS, e.g. BENCH_ARGS="--settings bf16+compile".
BENCH_ARGS ?=
bench: setup
	$(PYTHON) -m benchmarks.bench $(BENCH_ARGS)

# The GPU path proven and measured in under 9.5 minutes (tests, train/resume, DiT-XL/2 speed vs diffusers, guided
# sampling, toy paper preset) -> verdicts printed and a section in docs/benchmarks.md; a CPU dry run without a GPU.
# On a machine with its own Python and no internet (no .venv): make gpu-check PYTHON=python3
GPU_CHECK_ARGS ?=
gpu-check: $(if $(filter $(VENV)/bin/python,$(PYTHON)),setup)
	$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
