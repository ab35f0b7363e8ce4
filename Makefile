# Developer entry points. The local Kafka broker: deploy/kafka/broker.py (stdlib-only python3,
# Java 17+, Maven for the one-time jar fetch). Cache dir: $VOICECLONE_KAFKA_HOME or .cache/kafka.
PYTHON ?= python3
BROKER := $(PYTHON) deploy/kafka/broker.py

.PHONY: broker-fetch broker-start broker-stop broker-status

broker-fetch: ## Download the Kafka jars from Maven Central (once; cached)
	$(BROKER) fetch

broker-start: ## Start the local broker, or reuse a running one; prints bootstrap=HOST:PORT
	$(BROKER) start

broker-stop: ## Stop the local broker (SIGTERM, SIGKILL after 30 s)
	$(BROKER) stop

broker-status: ## running/stopped with bootstrap; exit 0 running, 1 not answering, 3 stopped
	$(BROKER) status
