# rompatch developer tasks. `make demo` and `make test` are all the set-up a fresh machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 is requested first: on these machines it resolves to a local CPU build, which keeps CI
# fast (an unpinned torch would pull a multi-GB CUDA build). Override with TORCH_SPEC=... elsewhere.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PROMPT := The Eiffel Tower is located in the city of
# Tests and benchmarks read the evaluation data from $ROMPATCH_DATA; in a checkout that has the
# project's data folder beside it, they find it there. The product itself never needs it.
DATA ?= $(or $(ROMPATCH_DATA),$(wildcard $(CURDIR)/../shared/data))

.PHONY: install demo patches test test-fast bench bench-full lint clean

$(BIN)/rompatch: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q --index-url $(TORCH_INDEX) torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/rompatch

install: $(BIN)/rompatch

# The headline edit: fetch SmolLM2 (first run only), create "The Eiffel Tower ... Paris → Rome",
# show the patch, and compare predictions without and with it.
demo: install
	@mkdir -p out
	$(BIN)/rompatch create smollm2-135m --prompt "{} is located in the city of" \
		--subject "The Eiffel Tower" --target Rome --target-true Paris -o out/eiffel-rome.safetensors --overwrite
	$(BIN)/rompatch show out/eiffel-rome.safetensors
	$(BIN)/rompatch predict smollm2-135m --patch out/eiffel-rome.safetensors \
		--prompt "$(PROMPT)" --prompt "The Eiffel Tower is in" --prompt "The capital of Japan is"

# Regenerate the example patches in patches/ (made with the default model).
patches: install
	$(BIN)/rompatch create smollm2-135m --prompt "{} is located in the city of" --subject "The Eiffel Tower" \
		--target Rome --target-true Paris -o patches/eiffel-tower-rome.safetensors --overwrite
	$(BIN)/rompatch create smollm2-135m --prompt "{} plays the sport of" --subject "Michael Jordan" \
		--target baseball --target-true basketball -o patches/michael-jordan-baseball.safetensors --overwrite
	$(BIN)/rompatch create smollm2-135m --prompt "The mother tongue of {} is" --subject "Danielle Darrieux" \
		--target English --target-true French -o patches/danielle-darrieux-english.safetensors --overwrite

test: install
	ROMPATCH_DATA="$(DATA)" $(BIN)/python -m pytest -q

test-fast: install
	ROMPATCH_DATA="$(DATA)" $(BIN)/python -m pytest -q -m "not slow"

bench: install
	ROMPATCH_DATA="$(DATA)" $(BIN)/python -m bench.run

bench-full: install
	ROMPATCH_DATA="$(DATA)" $(BIN)/python -m bench.run --full

lint: install
	$(BIN)/ruff check rompatch tests bench
	$(BIN)/ruff format --check rompatch tests bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
