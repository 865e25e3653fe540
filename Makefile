# eps — the two commands a user needs are `make demo` and `make test`.
#
#   make            build and install `eps` and `proxy` into cargo's bin directory
#                   (~/.cargo/bin for a rustup user) and create the development PKI if missing
#   make examples   install `internal-server`
#   make certs      create the development PKI (settings/dev/certs) if missing
#   make demo       run the five-process demo in this terminal (Ctrl-C stops it)
#   make test       formatting, lints and every test (what CI runs), then `N passed, N failed`
#   make bench      benchmarks (see bench/README.md)
#   make fuzz       fuzz the ClientHello reader, the _client splice and the JSON-RPC request
#                   parser, 5 minutes each (nightly; installs cargo-fuzz)

CARGO ?= cargo
# One target dir for `cargo install` and `cargo build`, so nothing is compiled twice.
INSTALL := $(CARGO) install --locked --quiet --target-dir target --path

.PHONY: all install examples certs demo test lint unit clean bench fuzz

all: install certs

install:
	$(INSTALL) crates/eps
	$(INSTALL) crates/proxy

examples:
	$(INSTALL) examples/internal-server

certs: settings/dev/certs/root.crt

settings/dev/certs/root.crt: | install
	"$${CARGO_HOME:-$$HOME/.cargo}/bin/eps" certs

demo:
	scripts/demo.sh

# BENCH_ARGS are passed on, e.g. `make bench BENCH_ARGS=--quick`.
bench:
	bench/run.sh $(BENCH_ARGS)

# FUZZ_SECONDS sets each target's run, FUZZ_TARGETS which run, e.g.
# `make fuzz FUZZ_TARGETS=params_splice FUZZ_SECONDS=60`. New inputs go to
# fuzz/corpus/TARGET/, crashes to fuzz/artifacts/TARGET/.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= client_hello params_splice jsonrpc_request
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for t in $(FUZZ_TARGETS); do \
	  $(CARGO) +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

test:
	scripts/test.sh

clean:
	$(CARGO) clean
