# The README's commands. Each target bootstraps what it needs on a fresh
# Debian 12 machine (as root): Debian packages through apt-get when missing,
# a virtualenv in .venv made from Debian's /usr/bin/python3 (so that the
# unprivileged users the tests and the demo run as, 1000 and 1337, can run it),
# and the project installed into it in editable mode with its extensions built.
#
# Where the work runs: those users must be able to read the checkout. When
# they cannot (a checkout under root's 0700 home, in `mktemp -d`, made with
# umask 077), the targets run in a world-readable mirror of it instead, in
# /var/lib/l4proxy/checkouts/<hash>/ (tools/mirror says how and why), with
# L4PROXY_SHARED naming the ../shared beside *this* checkout for the tests.
# What cannot work at all stops here with one line, before anything is done.

SHELL := /bin/bash
PY_SYS ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := iptables nftables iproute2 util-linux curl wrk gcc python3-dev python3-venv ca-certificates dnsmasq-base rsync
EXT_SOURCES := $(wildcard ext/*.pyx ext/*.pxd ext/*.pxi)
# What the Makefile creates, others (uid 1000, 1337) must be able to read.
UMASK := umask 022 &&

WORK_TARGETS := venv build lint unit test demo bench soak fuzz
.PHONY: help deps clean $(WORK_TARGETS)

help:
	@echo "make demo   - run the Istio request-routing tutorial locally (root, netns)"
	@echo "make test   - lint, type-check, and run the whole test suite"
	@echo "make bench  - benchmark against HAProxy, nginx and Envoy (not part of test)"
	@echo "make soak   - the 10-minute churn and keep-alive soaks (not part of test)"
	@echo "make fuzz   - the twins' mutation fuzz, 1,000 examples each (not part of test)"
	@echo "make clean  - remove the virtualenv, build outputs and the mirror (if any)"

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

ifdef L4PROXY_ORIGIN
# Run by the checkout's make in the mirror: ../shared is beside the checkout.
export L4PROXY_SHARED ?= $(abspath $(L4PROXY_ORIGIN)/..)/shared
WHERE := here
else ifneq ($(filter $(WORK_TARGETS),$(MAKECMDGOALS)),)
WHERE := $(shell DEB_PACKAGES="$(DEB_PACKAGES)" bash tools/mirror plan $(MAKECMDGOALS))
$(if $(filter error:%,$(WHERE)),$(error $(patsubst error:%,%,$(WHERE))))
endif

ifneq ($(filter mirror:%,$(WHERE)),)
MIRROR := $(patsubst mirror:%,%,$(WHERE))

# One sync, then the goals in the mirror (command-line variables such as
# PYTEST_ARGS follow through MAKEFLAGS, CI=true through the environment).
$(WORK_TARGETS): mirror-run ;
mirror-run: .stamp-deb
	@bash tools/mirror sync $(MIRROR)
	@$(MAKE) --no-print-directory -C $(MIRROR) L4PROXY_ORIGIN=$(CURDIR) $(filter $(WORK_TARGETS),$(MAKECMDGOALS))
.PHONY: mirror-run

else

$(VENV)/.stamp-deps: requirements.txt requirements-dev.txt .stamp-deb
	$(UMASK) test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(UMASK) $(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(UMASK) $(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py pyproject.toml $(EXT_SOURCES)
	$(UMASK) $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $@

venv: $(VENV)/.stamp-build
build: venv

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: venv
	$(UMASK) $(VENV)/bin/pytest -q -m "not netns"

# The suite runs in TEST_JOBS processes (pytest-xdist), a test file to each
# in turn: most of its time is spent waiting on namespaces, servers and
# timeouts, and test files share nothing (pods, ports and namespaces carry
# the process id; see l4proxy/demo/podnet.py). Three on a 2-core host: the
# waits of one overlap the others' work (the suite in 903 s with 3, under
# a second load, against 1,007 s with 2 alone). TEST_JOBS=0: one process.
TEST_JOBS ?= 3
test: lint
	$(UMASK) $(VENV)/bin/pytest -q -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

demo: venv
	$(UMASK) $(VENV)/bin/l4proxy demo $(DEMO_ARGS)

bench: venv
	$(UMASK) $(PY) -m bench $(BENCH_ARGS)

soak: venv
	$(UMASK) $(VENV)/bin/pytest -q -m slow --soak $(PYTEST_ARGS)

# The twins' mutation fuzz and generated hop-by-hop request and response
# heads (tests/test_relay_twins.py), 1,000 examples each instead of the
# suite's 15 to 25, then every answer and client case under a retry policy (the
# suite runs every other): about 25 minutes.
fuzz: venv
	$(UMASK) L4PROXY_FUZZ_EXAMPLES=$${L4PROXY_FUZZ_EXAMPLES:-1000} $(VENV)/bin/pytest -q tests/test_relay_twins.py -k "mutated or generated_hop" $(PYTEST_ARGS)
	$(UMASK) L4PROXY_TWINS_RETRIED_ALL=1 $(VENV)/bin/pytest -q tests/test_relay_twins_retries.py $(PYTEST_ARGS)

endif

clean:
	rm -rf $(VENV) build dist *.egg-info l4proxy/dataplane/_ext/*.so ext/*.c .stamp-deb
	@mirror=$$(bash tools/mirror path); if [ -d "$$mirror" ]; then \
	  echo "rm -rf $$mirror"; rm -rf "$$mirror" || echo "cannot remove the mirror $$mirror: run make clean as root" >&2; \
	fi
