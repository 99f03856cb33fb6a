# The README's commands. Each target bootstraps what it needs on a fresh
# Debian 12 machine (as root): Debian packages through apt-get when missing,
# a virtualenv in .venv made from Debian's /usr/bin/python3 (so that the
# unprivileged users the tests and the demo run as, 1000 and 1337, can run it),
# and the project installed into it in editable mode with its extensions built.

SHELL := /bin/bash
PY_SYS ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := iptables nftables iproute2 util-linux curl wrk gcc python3-dev python3-venv ca-certificates dnsmasq-base
EXT_SOURCES := $(wildcard ext/*.pyx ext/*.pxd)

.PHONY: help deps venv build test lint unit demo bench soak clean

help:
	@echo "make demo   - run the Istio request-routing tutorial locally (root, netns)"
	@echo "make test   - lint, type-check, and run the whole test suite"
	@echo "make bench  - benchmark against HAProxy, nginx and Envoy (not part of test)"
	@echo "make soak   - the 10-minute churn and keep-alive soaks (not part of test)"
	@echo "make clean  - remove the virtualenv and build outputs"

# Debian packages: install only those missing (dpkg-query is quick and offline).
.stamp-deb: Makefile
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "error: need root to apt-get install$$missing" >&2; exit 1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

$(VENV)/.stamp-deps: requirements.txt requirements-dev.txt .stamp-deb
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py pyproject.toml $(EXT_SOURCES)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $@

venv: $(VENV)/.stamp-build
build: venv

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q -m "not netns"

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/l4proxy demo $(DEMO_ARGS)

bench: venv
	$(PY) -m bench $(BENCH_ARGS)

soak: venv
	$(VENV)/bin/pytest -q -m slow --soak $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info l4proxy/_ext/*.so ext/*.c .stamp-deb
