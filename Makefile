# vmgrid — build, generate, test.
#
#   make run        build and run the demo (see README)
#   make test       everything CI checks: formatting, vet, stale protos, wire compatibility, tests with -race, the fault suite, the compose suite
#   make proto      regenerate Go code from proto/ (buf + local plugins)
#   make proto-image  record proto/image.binpb, the wire API check-breaking keeps when HEAD~1 is absent
#   make faults     the fault-injection suite (integration/faults: real processes killed, etcd stopped, probes)
#   make bench      run the benchmarks (slow; not part of test)
#   make bench-clone  the GVFS cloning experiment (several minutes)
#   make images     the compose grid's local images (vmgrid:local FROM scratch, vmgrid-plant:local over a debootstrapped base)
#   make compose-up / compose-down  the compose demo grid (deploy/compose.yaml) up, and down leaving nothing
#   make compose-test  fault tests across containers on a compose grid of its own (integration/compose; build tag compose)
#   make bench-placement  the auction with 10,000 registered plants against a real etcd

GO        ?= go
TOOLS     := $(CURDIR)/.build/tools
BIN       := $(CURDIR)/bin
export PATH := $(TOOLS):$(PATH)

BUF_VERSION          := v1.75.0
PROTOC_GEN_GO        := v1.36.12
PROTOC_GEN_GO_GRPC   := v1.6.2
PROTOC_GEN_GATEWAY   := v2.29.0

.PHONY: all setup build run test faults unit check-fmt vet check-protos check-breaking proto proto-image tools bench bench-clone clean \
	images images-clean compose-up compose-down compose-test bench-placement

all: build

# Static: vmgrid-agent is the guest agent put into golden images (vmgrid
# looks for it beside itself; statically linked, vmgrid can be the agent too).
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/vmgrid ./cmd/vmgrid
	CGO_ENABLED=0 $(GO) build -o $(BIN)/vmgrid-agent ./cmd/vmgrid-agent

setup:
	./deploy/setup.sh

run: setup build
	./deploy/demo.sh

$(TOOLS)/buf:
	GOBIN=$(TOOLS) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(TOOLS)/protoc-gen-go:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO)
$(TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC)

$(TOOLS)/protoc-gen-grpc-gateway:
	GOBIN=$(TOOLS) $(GO) install github.com/grpc-ecosystem/grpc-gateway/v2/protoc-gen-grpc-gateway@$(PROTOC_GEN_GATEWAY)

tools: $(TOOLS)/buf $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc $(TOOLS)/protoc-gen-grpc-gateway

proto: tools
	buf lint
	buf generate

# Regenerate into a scratch copy and compare: fails when committed code is
# stale (*.pb.gw.go: the shop's HTTP/JSON gateway).
GENERATED := -name '*.pb.go' -o -name '*.pb.gw.go'
check-protos: tools
	@rm -rf .build/protocheck && mkdir -p .build/protocheck
	@cp -r proto buf.yaml buf.gen.yaml .build/protocheck/
	@cd .build/protocheck && find proto \( $(GENERATED) \) -delete && buf lint && buf generate
	@for f in $$(cd .build/protocheck && find proto $(GENERATED)); do \
		cmp -s "$$f" ".build/protocheck/$$f" || { echo "generated code is stale: $$f (run make proto)"; exit 1; }; \
	done
	@for f in $$(find proto $(GENERATED)); do \
		[ -f ".build/protocheck/$$f" ] || { echo "generated file without a source: $$f"; exit 1; }; \
	done
	@echo "generated code is up to date"

# Wire compatibility: the protos must not break the previous commit's. A
# shallow clone (CI) may lack HEAD~1: then the baseline is the committed
# image proto/image.binpb (make proto-image records it, at a release).
check-breaking: tools
	@if git rev-parse -q --verify HEAD~1 >/dev/null 2>&1; then \
		buf breaking --against '.git#ref=HEAD~1'; \
	else \
		echo "no previous commit (shallow clone): checking against proto/image.binpb"; \
		buf breaking --against proto/image.binpb; \
	fi
	@echo "protos are wire compatible"

proto-image: tools
	buf build -o proto/image.binpb

check-fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

unit:
	$(GO) test -race -timeout 20m ./...

test: check-fmt vet check-protos check-breaking unit faults compose-test

# The audit's kinds of test as a suite of their own (build tag faults):
# without -race, for speed; it needs root, FUSE, QEMU and KVM.
faults: build
	$(GO) vet -tags faults ./integration/faults/
	$(GO) test -tags faults -count=1 -v -timeout 12m ./integration/faults/

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./imageserver/
	$(GO) test -run '^$$' -bench . ./computeserver/blockcache/

bench-clone: build
	$(BIN)/vmgrid bench clone --out .build/clonebench

# The compose grid (deploy/compose): Docker from Debian's packages (make
# setup), dockerd started when none runs (and stopped by compose-down only
# if it was started here), images built locally from nothing.
images: setup
	./deploy/compose/images.sh

compose-up: setup build
	./deploy/compose/up.sh

compose-down:
	./deploy/compose/down.sh

# The images make images built (label vmgrid), the plant base included.
images-clean:
	@ids=$$(docker images -q --filter label=vmgrid | sort -u); [ -z "$$ids" ] || docker rmi -f $$ids

# Its own grid (project vmgrid-ct-…) and images, brought up and down by
# the suite (TestMain: images.sh, up.sh, down.sh; dockerd stopped at the
# end when the suite started it).
compose-test: setup build
	$(GO) vet -tags compose ./integration/compose/
	$(GO) test -tags compose -count=1 -v -timeout 15m ./integration/compose/

bench-placement:
	$(GO) test -run '^$$' -bench BenchmarkPlacement10k -benchtime 200x -timeout 20m ./shop/market/

clean:
	rm -rf $(BIN) .build
