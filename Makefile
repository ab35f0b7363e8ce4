# Developer entry points. The local Kafka broker: deploy/kafka/broker.py (stdlib-only python3,
# Java 17+, Maven for the one-time jar fetch). Cache dir: $VOICECLONE_KAFKA_HOME or .cache/kafka.
PYTHON ?= python3
BROKER := $(PYTHON) deploy/kafka/broker.py
# The local Schema Registry (Apicurio, Confluent-compatible API): deploy/registry/registry.py,
# same requirements. Cache dir: $VOICECLONE_REGISTRY_HOME or .cache/registry.
REGISTRY_SCRIPT := $(PYTHON) deploy/registry/registry.py
# uv as a module of the machine's python: works whether or not a `uv` binary is on PATH.
UV := $(PYTHON) -m uv
UV_VERSION := 0.13.9

# `make run`: the official weights (cached, or downloaded once if the hub answers), else the
# synthetic model; MODEL=synthetic: the tiny offline model; MODEL=DIR: your weights.
MODEL ?=
# `make run REGISTRY=1`: registry mode, on the local Schema Registry (docs/schema-registry.md).
REGISTRY ?=
REGISTRY_ENV = $(if $(REGISTRY),VOICECLONE_SCHEMA_REGISTRY_URL=$$($(REGISTRY_SCRIPT) url))
DEMO = $(PYTHON) deploy/demo.py
BOOTSTRAP_ENV = VOICECLONE_KAFKA__BOOTSTRAP_SERVERS=$$($(BROKER) bootstrap)

COMPOSE = docker compose -f deploy/compose/compose.yaml

.PHONY: setup test lint docs run run-offline stop worker-stop topics broker-fetch broker-start \
	broker-stop broker-status kafka-tool deploy-tools stack-up stack-down registry-fetch \
	registry-start registry-stop registry-status schemas-check

setup: ## Install uv if missing, then the locked environment with every extra
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --all-extras --frozen

test: setup deploy-tools ## Set up and run the whole suite; it starts and stops the broker itself
	$(UV) run --frozen pytest

lint: setup ## ruff (lint and formatting), import-linter (pyproject's import contracts), pyright (types)
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen lint-imports
	$(UV) run --frozen pyright

docs: setup ## Build the docs site into site/, failing on broken links (docs/development.md)
	NO_MKDOCS_2_WARNING=1 $(UV) run --frozen mkdocs build --strict

.PHONY: bench
bench: setup broker-start ## Benchmarks on the local broker (docs/benchmarks.md); BENCH_ARGS=--quick
	$(UV) run --frozen python -m bench --bootstrap $$($(BROKER) bootstrap) $(BENCH_ARGS)

.PHONY: bench-engine
bench-engine: setup ## Talker generation, stock vs fast loop (docs/gpu-service.md); BENCH_ARGS=--size 0.6B
	$(UV) run --frozen python -m bench.engine $(BENCH_ARGS)

.PHONY: bench-serving
bench-serving: setup ## Concurrent requests through the engine, batched vs one at a time (docs/gpu-service.md)
	$(UV) run --frozen python -m bench.serving $(BENCH_ARGS)

run: setup broker-start $(if $(REGISTRY),registry-start) ## The main job: broker, topics, a local worker (left running), one request; REGISTRY=1: registry mode
	$(BOOTSTRAP_ENV) $(REGISTRY_ENV) $(UV) run --frozen python deploy/demo.py run $(if $(MODEL),--model '$(MODEL)')

run-offline: ## `make run` with the synthetic tiny model: no download, speaks noise
	$(MAKE) run MODEL=synthetic

worker-stop: ## Stop the worker `make run` started (SIGTERM: it drains first)
	$(DEMO) stop

stop: worker-stop broker-stop registry-stop ## Stop the worker, the local broker and the local Schema Registry

topics: ## Create the product's topics on the local broker (idempotent)
	$(BOOTSTRAP_ENV) $(UV) run --frozen voiceclone topics create

broker-fetch: ## Download the Kafka jars from Maven Central (once; cached)
	$(BROKER) fetch

broker-start: ## Start the local broker, or reuse a running one; prints bootstrap=HOST:PORT
	$(BROKER) start

broker-stop: ## Stop the local broker (SIGTERM, SIGKILL after 30 s)
	$(BROKER) stop

broker-status: ## running/stopped with bootstrap; exit 0 running, 1 not answering, 3 stopped
	$(BROKER) status

kafka-tool: ## One of Kafka's tools on the local broker: make kafka-tool ARGS='kafka-topics --list'
	$(BROKER) tool $(ARGS)

schemas-check: setup ## The event schemas against every released version (and the registry, if VOICECLONE_SCHEMA_REGISTRY_URL is set)
	$(UV) run --frozen voiceclone schemas check

registry-fetch: ## Download the Schema Registry (Apicurio) from Maven Central (once; cached)
	$(REGISTRY_SCRIPT) fetch

registry-start: ## Start the local Schema Registry, or reuse a running one; prints url=URL
	$(REGISTRY_SCRIPT) start

registry-stop: ## Stop the local Schema Registry (in-memory: its schemas go with it)
	$(REGISTRY_SCRIPT) stop

registry-status: ## running/stopped with url; exit 0 running, 1 not answering, 3 stopped
	$(REGISTRY_SCRIPT) status

deploy-tools: ## Install the deploy validators (helm, compose, hadolint, schemas) into .cache/tools
	@# Exit 3: a tool cannot be had on this machine; the tests that need it skip and say why.
	$(PYTHON) deploy/tools/install.py || [ $$? -eq 3 ]

stack-up: ## The full local stack in Docker (Kafka, MinIO, Prometheus, Grafana, worker)
	$(COMPOSE) up -d --build

stack-down: ## Stop the local Docker stack
	$(COMPOSE) down
