# verse-cli developer targets. `make demo` and `make test` install first when needed.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
SHARED    ?= ../shared

.PHONY: install test demo lint models bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check verse_cli tests bench

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" SHARED=$(SHARED) bash examples/demo.sh

models: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash models/train_all.sh

clean:
	rm -rf demo-out .pytest_cache
