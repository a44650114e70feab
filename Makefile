# Targets named in CONTRIBUTING.md.
.PHONY: install test lint format check bench bench-ops

install:
	pip install "torch==2.13.0" -e ".[dev]"

test:
	pytest

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .

check:
	prefloss check

bench:
	prefloss bench

bench-ops:
	pytest bench/ --benchmark-only
