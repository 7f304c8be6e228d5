# make train | test | tensorboard | sweep | lint | docs. The first target that needs it creates .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test tensorboard sweep lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/cvae-train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir outputs || $(BIN)/python -m tensorboard.main --logdir outputs

sweep: $(STAMP)
	$(BIN)/cvae-train sweep=latent_dim $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cvae_exp tests

clean:
	rm -rf $(VENV) .pytest_cache
