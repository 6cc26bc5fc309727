# The two entry points of the README. Both run the idempotent set-up first (apt
# packages, venv, BCC links), which takes seconds once everything is installed.
.PHONY: setup demo test lint bench

setup:
	./scripts/setup

demo: setup
	venv/bin/lbd demo

test: setup
	./scripts/test

lint:
	venv/bin/ruff check lbd backends bpf_lb benchmarks tests manifests
	venv/bin/ruff format --check lbd backends bpf_lb benchmarks tests manifests

bench: setup
	venv/bin/python -m benchmarks
