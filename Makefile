# make demo: install into .venv and run a real distillation on the bundled digits data (offline).
# make test: install into .venv and run the test suite (slow tests excluded; `make test-slow` runs them).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdcli-installed
DEMO_HOME := $(CURDIR)/runs/demo-home
DEMO_RUNS := $(CURDIR)/runs/demo

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade-strategy only-if-needed -c constraints.txt -e '.[test,plot]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	KD_HOME=$(DEMO_HOME) $(BIN)/kd train resnet32 --preset quickstart --out $(DEMO_RUNS)/teacher --overwrite
	KD_HOME=$(DEMO_HOME) $(BIN)/kd distill --teacher resnet32 --student resnet8 --method kd --preset quickstart --out $(DEMO_RUNS)/kd --overwrite
	KD_HOME=$(DEMO_HOME) $(BIN)/kd eval $(DEMO_RUNS)/kd/student.safetensors

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs build *.egg-info
