# Two entry points a new machine needs: `make run` and `make test`.
# The virtual environment lives in .venv. torch is pinned in the install command below (an open
# range pulls a multi-GB CUDA build); pyproject.toml has a range, which keeps a GPU user's torch.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup run test lint report docs clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 -e '.[test,slurm]'
	touch $@

# The main job: the default config's model.mllm and every default target.
run: setup
	snakemake --cores $(CORES)

lint: setup
	snakefmt --check Snakefile workflow
	snakemake --lint

# Two pytest workers (pytest-xdist): the whole-workflow tests are single-process work most of the time.
# The SLURM tests share one private cluster, so they stay on one worker (xdist_group, --dist loadgroup).
test: lint
	python -m pytest -n $(CORES) --dist loadgroup

report: setup
	snakemake --cores $(CORES) --report report.html

# The configuration reference is generated from the schema (tests/test_docs.py keeps it in step).
docs: setup
	python -m shadowquant.config_reference > docs/configuration.md

clean:
	rm -rf results logs benchmarks model.mllm report.html .snakemake
