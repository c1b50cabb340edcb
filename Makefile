# nit-lightning. `make demo` and `make test` set everything up on a fresh machine (CPU torch, no GPU needed).
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= experiments/demo.yaml
DEMO_OUT ?= demo_out
DEMO_T2I_CONFIG ?= experiments/demo_t2i.yaml
DEMO_T2I_OUT ?= demo_t2i_out
# Sweep variables (make eval-res-sweep CKPT=... REF_DIR=... NUM=50000 OUT=...); without CKPT the sweeps run at demo
# scale on the model `make demo` trained (demo-scale sweep files, the demo feature net, DEMO_OUT/sweeps/<name>/).
CKPT ?=
REF_DIR ?= references
NUM ?= 50000
OUT ?= outputs/sweeps
SWEEP_ARGS ?=
# THREADS=N: torch intra-op threads for every target (`--threads N` to the demo and sweeps, OMP_NUM_THREADS=N for the
# tests and benches). On a machine shared with other busy processes, THREADS=1 (README: 2 threads under load made a
# step 10x slower). Empty: the demo config's threads, torch's default elsewhere.
# COCO-2014 zero-shot T2I evaluation (make eval-t2i CKPT=... COCO_CAPTIONS=.../captions_val2014.json
# COCO_IMAGES=.../val2014 CLIP=<local CLIP folder> [N=30000 SIZE=1024 OUT=...]): docs/t2i.md "Evaluation".
COCO_CAPTIONS ?=
COCO_IMAGES ?=
CLIP ?=
N ?= 30000
SIZE ?= 1024
COCO_SEED ?= 0
FEATURES ?= inception
SAMPLE_ARGS ?=
# OUT is the sweeps' folder by default; eval-t2i writes to OUT when it is given on the command line (or in the
# environment), else to outputs/eval_t2i.
T2I_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),outputs/eval_t2i)
# The reference's real images: the N chosen ones (linked by coco-prompts); REF_IMAGES=$(COCO_IMAGES) for all of val2014.
REF_IMAGES ?= $(T2I_OUT)/real
THREADS ?=
THREADS_FLAG := $(if $(THREADS),--threads $(THREADS))
THREADS_ENV := $(if $(THREADS),OMP_NUM_THREADS=$(THREADS))

.PHONY: install test test-fast test-slurm demo demo-ablation demo-t2i bench gpu-check eval-res-sweep eval-ar-sweep eval-t2i \
	clean

install: $(STAMP)

# torch==2.13.0 first (a CPU build that lies on this disk); requirements.txt says torch>=2.5 and so keeps it.
# Then the package itself, editable (pyproject.toml): bench/ and tests/ import it like any installed package.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: install
	$(THREADS_ENV) $(PY) -m pytest -q

# Skips the tests marked slow (multi-process DDP, end-to-end commands).
test-fast: install
	$(THREADS_ENV) $(PY) -m pytest -q -m "not slow"

# The sbatch scripts on a real two-node SLURM cluster on this host (tests/slurm, docs/slurm.md): needs root, installs
# Debian's slurmctld/slurmd/slurm-client/munge if absent, starts the daemons, stops them at the end (also on failure).
test-slurm: install
	NIT_SLURM_TESTS=1 $(PY) -m pytest -q -p no:cacheprovider --durations=0 tests/slurm; status=$$?; \
	$(PY) tests/slurm/slurm_cluster.py down >/dev/null; exit $$status

demo: install
	$(PY) -m nit_lightning demo --config $(DEMO_CONFIG) --out $(DEMO_OUT) $(THREADS_FLAG)

demo-ablation: install
	$(PY) -m nit_lightning demo --config $(DEMO_CONFIG) --out $(DEMO_OUT) --ablation $(THREADS_FLAG)

# NiT-T2I on a CPU: does it draw the colour and shape a prompt names, also for held-out pairs and unseen sizes?
demo-t2i: install
	$(PY) -m nit_lightning demo --config $(DEMO_T2I_CONFIG) --out $(DEMO_T2I_OUT) $(THREADS_FLAG)

bench: install
	$(THREADS_ENV) $(PY) bench/attention.py $(THREADS_FLAG)
	$(THREADS_ENV) $(PY) bench/packing.py
	$(THREADS_ENV) $(PY) bench/train_step.py
	$(THREADS_ENV) $(PY) bench/sampling.py
	$(THREADS_ENV) $(PY) bench/prepare.py

gpu-check: install
	$(THREADS_ENV) $(PY) bench/gpu_check.py --out outputs/gpu_check.json

eval-res-sweep: install
ifeq ($(CKPT),)
	$(PY) -m nit_lightning demo --config $(DEMO_CONFIG) --out $(DEMO_OUT) --sweep experiments/sweeps/demo_resolution.yaml $(THREADS_FLAG)
else
	$(PY) -m nit_lightning sweep --sweep experiments/sweeps/resolution.yaml --ckpt $(CKPT) --ref-dir $(REF_DIR) --num-samples $(NUM) --out $(OUT)/resolution $(THREADS_FLAG) $(SWEEP_ARGS)
endif

eval-ar-sweep: install
ifeq ($(CKPT),)
	$(PY) -m nit_lightning demo --config $(DEMO_CONFIG) --out $(DEMO_OUT) --sweep experiments/sweeps/demo_aspect_ratio.yaml $(THREADS_FLAG)
else
	$(PY) -m nit_lightning sweep --sweep experiments/sweeps/aspect_ratio.yaml --ckpt $(CKPT) --ref-dir $(REF_DIR) --num-samples $(NUM) --out $(OUT)/aspect_ratio $(THREADS_FLAG) $(SWEEP_ARGS)
endif

# coco-prompts -> sample --prompts -> reference build (real images at their native sizes, brought to SIZE by the
# reference protocol) -> evaluate: FID & co. + CLIP score, all under $(T2I_OUT).
eval-t2i: install
	@test -n "$(CKPT)" -a -n "$(COCO_CAPTIONS)" -a -n "$(COCO_IMAGES)" -a -n "$(CLIP)" || { echo "make eval-t2i needs \
	CKPT=<T2I checkpoint> COCO_CAPTIONS=<captions_val2014.json> COCO_IMAGES=<val2014 folder> CLIP=<local CLIP folder>" \
	>&2; exit 2; }
	$(PY) -m nit_lightning coco-prompts --captions $(COCO_CAPTIONS) --num-samples $(N) --seed $(COCO_SEED) --size $(SIZE) --out $(T2I_OUT)/prompts.jsonl --list $(T2I_OUT)/real_images.txt --images $(COCO_IMAGES) --real-dir $(T2I_OUT)/real
	$(PY) -m nit_lightning sample --ckpt $(CKPT) --prompts $(T2I_OUT)/prompts.jsonl --out $(T2I_OUT)/samples $(THREADS_FLAG) $(SAMPLE_ARGS)
	$(PY) -m nit_lightning reference build --images $(REF_IMAGES) --size $(SIZE) --features $(FEATURES) --out $(T2I_OUT)/reference_$(SIZE).npz
	$(PY) -m nit_lightning evaluate --samples $(T2I_OUT)/samples --ref $(T2I_OUT)/reference_$(SIZE).npz --features $(FEATURES) --clip-model $(CLIP) --out $(T2I_OUT)/results.json

clean:
	rm -rf $(DEMO_OUT) $(DEMO_T2I_OUT) .pytest_cache
