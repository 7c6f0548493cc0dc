# m2mguard — entry points. `make help` lists them.

GO        ?= go
VAULT_BIN := $(CURDIR)/.bin/vault
FUZZTIME  ?= 60s
# A count, not a duration: a duration races the engine's deadline (tools/fuzz.sh).
FUZZTIME_SHORT ?= 3000x
GOFILES    = $(shell find . -name '*.go' -not -path './.bin/*')

.PHONY: help test vet fmt-check vault fuzz bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: run cc-check
run: ## the broker on the embedded store in ./data, no Vault, no config (ARGS="--help" for flags)
	@echo "make run: building bin/m2mguard-broker (the first time Go downloads and compiles ~320 packages: about a minute)"
	@GO=$(GO) sh tools/build-progress.sh bin/m2mguard-broker ./cmd/m2mguard-broker
	exec ./bin/m2mguard-broker $(ARGS)

# Cheap checks first (seconds), then the Vault build (minutes, once), then the suite.
test: cc-check fmt-check vet vault ## the whole suite: gofmt, go vet, go test -race, Vault included, short fuzzing
	M2MGUARD_VAULT_BIN=$(VAULT_BIN) $(GO) test -race -count=1 ./...
	$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZTIME_SHORT)

cc-check: ## fail early if there is no C compiler (go test -race needs cgo)
	@cc=$$($(GO) env CC); command -v "$${cc%% *}" >/dev/null 2>&1 || { \
	  echo "make test needs a C compiler for go test -race (cgo): none found ($$cc)."; \
	  echo "Debian/Ubuntu: apt-get install -y gcc libc6-dev"; exit 1; }

fmt-check: ## fail if gofmt would change a file
	@out=$$(gofmt -l $(GOFILES)); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet: ## go vet
	$(GO) vet ./...

vault: $(VAULT_BIN) ## build the Vault server the tests run (once; cached in .bin/)

$(VAULT_BIN): tools/vault/go.mod
	@echo "building Vault for the tests into .bin/ (once: about 12 minutes on 2 cores)"
	cd tools/vault && $(GO) build -mod=mod -o $(VAULT_BIN) github.com/hashicorp/vault
	@touch $(VAULT_BIN)

fuzz: ## run every fuzz target for FUZZTIME each (default 60s; make test runs 3000 executions each)
	@GO=$(GO) FUZZTIME=$(FUZZTIME) M2MGUARD_VAULT_BIN=$(VAULT_BIN) sh tools/fuzz.sh

bench: ## Go benchmarks of the hot paths
	$(GO) test -run '^$$' -bench . -benchmem ./...

clean: ## remove built binaries (the Vault binary too)
	rm -rf .bin bin
