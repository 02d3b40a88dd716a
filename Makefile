# Two commands do everything on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := build/demo

.PHONY: demo test clean

# torch is installed first, pinned: 2.13.0's CPU build comes from the local disk; anything unpinned would pull
# a multi-GB CUDA build. Editable "compat" mode puts the repo on sys.path, so a port generated elsewhere (the
# demo's) can shadow the committed one when run from its own folder.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

demo: $(INSTALLED)
	$(BIN)/recipes-scaffold gpt_oss --from transformers --out $(DEMO) --force
	$(BIN)/recipes-scaffold tiny-checkpoint gpt_oss --out $(DEMO)/checkpoints/tiny-gpt_oss
	cd $(DEMO) && ../../$(BIN)/python -m generated_models.gpt_oss.infer --config config/gpt_oss.yaml \
		--model-path checkpoints/tiny-gpt_oss --output-json results/gpt_oss.json \
		--prompt "Hello" --prompt "The quick brown fox jumps over the lazy dog" \
		--prompt "In a hole in the ground there lived a hobbit"

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build results .pytest_cache
