# `make demo` and `make test` each set up a fresh machine first (apt tools, .venv).
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/covid-plugin demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/ingest.py
	.venv/bin/python benchmarks/latency.py
