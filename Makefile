# make train | test | test-cluster | tensorboard | sweep | bench | table | docs | lint. The first target that needs it creates .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test test-cluster tensorboard sweep bench table docs lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat: the repository on sys.path, so Hydra's scan of the hydra_plugins namespace finds our launcher
	# (setuptools' default editable finder is invisible to pkgutil.walk_packages)
	$(BIN)/pip install -q -e ".[dev,cluster]" --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/cvae-train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The tests on a real SLURM cluster (tests/test_slurm.py, marker `slurm`): a one-node cluster of this machine,
# started and stopped by the tests (scripts/slurm_local.sh); they skip, saying why, where SLURM is not installed
# (apt-get install -y slurmctld slurmd slurm-client munge). One process: the jobs take the cores.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest tests/test_slurm.py -m slurm -n 0 -rs $(ARGS)

tensorboard: $(STAMP)
	$(BIN)/python -c "import tensorboard" 2>/dev/null || $(BIN)/pip install -q tensorboard
	$(BIN)/tensorboard --logdir outputs

sweep: $(STAMP)
	$(BIN)/cvae-train sweep=latent_dim $(ARGS)

bench: $(STAMP)
	$(BIN)/cvae-bench experiment=sohn2015 $(ARGS)

# Sohn et al. (2015) Table 1: 12 models, evaluated on val and test, and the report.
table: $(STAMP)
	scripts/sohn2015_table.sh outputs/sohn2015 $(ARGS)

docs: $(STAMP)
	$(BIN)/python scripts/gen_config_docs.py

lint: $(STAMP)
	$(BIN)/ruff check cvae_exp tests scripts hydra_plugins

clean:
	rm -rf $(VENV) .pytest_cache
