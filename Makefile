# make run: the whole pipeline on the embedded generated dataset (no network needed).
# make test: the test suite. Both create .venv from requirements.lock first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock requirements-nodeps.txt pyproject.toml | cksum | cut -d' ' -f1)
CORES ?= $(shell nproc)
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: run test test-extended test-fast chaos lock repro clean sample

$(STAMP): requirements.lock requirements-nodeps.txt pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	snakemake --cores $(CORES)
	@echo "Report: results/report.md"

# make sample: the real sample (config/params.sample.yaml) in runs/sample/, beside the default run.
# SAMPLE_MIRROR=/path: a file:// mirror instead of the public bucket; SHARED_YT8M: the shared real
# shards, laid out as a mirror of symlinks (runs/sample/mirror) when SAMPLE_MIRROR is not given;
# SAMPLE_VOCABULARY: the class names (default: the shared vocabulary.csv when present).
SAMPLE := runs/sample
SHARED_YT8M ?= $(CURDIR)/../shared/yt8m
SAMPLE_MIRROR ?= $(if $(wildcard $(SHARED_YT8M)/2018/video/validate0099.tfrecord),$(CURDIR)/$(SAMPLE)/mirror,)
SAMPLE_VOCABULARY ?= $(wildcard $(SHARED_YT8M)/2018/vocabulary.csv)

sample: $(STAMP)
	mkdir -p $(SAMPLE)
	ln -sfn ../../workflow $(SAMPLE)/workflow && ln -sfn ../../src $(SAMPLE)/src
	$(if $(filter $(CURDIR)/$(SAMPLE)/mirror,$(SAMPLE_MIRROR)),mkdir -p $(SAMPLE)/mirror/2/video/validate && \
		ln -sf $(SHARED_YT8M)/2018/video/validate00*.tfrecord $(SAMPLE)/mirror/2/video/validate/,)
	sed $(if $(SAMPLE_MIRROR),-e 's|^  source: gs://us.data.yt8m.org|  source: file://$(SAMPLE_MIRROR)|',) \
		$(if $(SAMPLE_VOCABULARY),-e 's|^evaluate:$$|&\n  vocabulary: $(SAMPLE_VOCABULARY)|',) -e '' \
		config/params.sample.yaml > $(SAMPLE)/params.yaml.tmp && mv $(SAMPLE)/params.yaml.tmp $(SAMPLE)/params.yaml
	snakemake --snakefile $(CURDIR)/workflow/Snakefile --directory $(SAMPLE) --cores $(CORES)
	@echo "Report: $(SAMPLE)/results/report.md"

test: $(STAMP)
	pytest -m "not chaos and not extended"

# make test-extended: the checks left out of make test for its 20-minute budget (real-data training,
# the out-of-memory cap, a dvc exp sweep, SLURM's sbatch through a stand-in); they pass, they are only long.
test-extended: $(STAMP)
	pytest -m extended

# make chaos: the tiny DAG SIGKILLed at least 10 times under each orchestrator (tests/test_chaos.py);
# CHAOS_SEED=n draws other kill moments.
chaos: $(STAMP)
	pytest -m chaos -s tests/test_chaos.py

test-fast: $(STAMP)
	pytest -m "not slow"

repro: $(STAMP)
	dvc repro

lock:
	rm -rf /tmp/yt8m-qrnn-lock && $(PYTHON) -m venv /tmp/yt8m-qrnn-lock
	/tmp/yt8m-qrnn-lock/bin/pip install --quiet -r requirements.in
	/tmp/yt8m-qrnn-lock/bin/pip freeze > requirements.lock
	$(PYTHON) tools/lockfile.py requirements.lock workflow/envs/pipeline.yaml

clean:
	rm -rf resources/generated resources/yt8m resources/work .snakemake logs
