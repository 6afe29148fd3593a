# The two set-up commands from the README. Each creates or reuses .venv (scripts/venv.sh).
.PHONY: train test

train:
	@bash scripts/venv.sh
	.venv/bin/python -m vespo train $(ARGS)

test:
	@bash scripts/venv.sh
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q
