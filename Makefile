# moonwire build. `make` builds build/moonwire/core.so; `make test` runs the suite against
# the build tree; `make test-asan` does the same with an ASan+UBSan build.
LUA       ?= lua5.4
BUSTED    ?= busted
LUAROCKS  ?= luarocks
PKG       ?= pkg-config
CC        ?= cc

LUA_INCDIR ?=
LUA_CFLAGS := $(if $(LUA_INCDIR),-I$(LUA_INCDIR),$(shell $(PKG) --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4))
# llhttp: a system libllhttp when pkg-config knows one, else the C sources Debian's
# node-llhttp ships (compiled into the module; never copied into this repository).
LLHTTP_PC := $(shell $(PKG) --exists libllhttp 2>/dev/null && echo yes)
ifeq ($(LLHTTP_PC),yes)
  LLHTTP_CFLAGS := $(shell $(PKG) --cflags libllhttp)
  LLHTTP_LIBS   := $(shell $(PKG) --libs libllhttp)
  LLHTTP_SRC    :=
else
  LLHTTP_DIR    ?= /usr/share/llhttp
  LLHTTP_CFLAGS := -I/usr/share/include/llhttp -DLLHTTP_STRICT_MODE=1
  LLHTTP_LIBS   :=
  LLHTTP_SRC    := $(wildcard $(LLHTTP_DIR)/llhttp.c $(LLHTTP_DIR)/api.c $(LLHTTP_DIR)/http.c)
endif

WARN      := -Wall -Wextra -Wshadow -Wno-unused-parameter
CFLAGS    ?= -O2 -g
ALL_CFLAGS = -std=gnu11 -fPIC $(WARN) $(CFLAGS) $(LUA_CFLAGS) $(LLHTTP_CFLAGS) -fvisibility=hidden
LIBS       = $(LLHTTP_LIBS) -lssl -lcrypto -lz -lm -lpthread

SRC := $(wildcard src/*.c)
HDR := $(wildcard src/*.h)

BUILD ?= build
OBJ := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(SRC)) $(patsubst $(LLHTTP_DIR)/%.c,$(BUILD)/obj/llhttp_%.o,$(LLHTTP_SRC))
SO  := $(BUILD)/moonwire/core.so

.PHONY: all test test-asan lint demo install clean deps test-deps bench fuzz

all: $(SO)

# objects depend on this file too: changed flags rebuild them
$(BUILD)/obj/%.o: src/%.c $(HDR) Makefile | $(BUILD)/obj
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

# third-party sources: no warnings of ours
$(BUILD)/obj/llhttp_%.o: $(LLHTTP_DIR)/%.c Makefile | $(BUILD)/obj
	$(CC) -std=gnu11 -fPIC $(CFLAGS) $(LLHTTP_CFLAGS) -w -c -o $@ $<

$(BUILD)/obj:
	mkdir -p $@ $(BUILD)/moonwire

$(SO): $(OBJ)
	$(CC) -shared $(CFLAGS) -Wl,-z,nodelete -o $@ $(OBJ) $(LIBS)

deps:
	@scripts/install-deps

# the suite also drives real peers: node's ws (npm), headless chromium
test-deps: deps
	@scripts/install-peers

# The suite: busted on spec/ against the build tree; prints "N passed, N failed".
test: test-deps all
	@scripts/run-tests $(BUILD)

ASAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
test-asan: test-deps
	$(MAKE) BUILD=build-asan CFLAGS="$(ASAN_FLAGS)" all
	@MW_ASAN=1 scripts/run-tests build-asan

lint: deps
	luacheck -q lua spec examples bench
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability,performance \
	  --inline-suppr --suppress=missingIncludeSystem --suppress=toomanyconfigs $(LUA_CFLAGS) src/

demo: deps all
	LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(BUILD)/?.so;;" $(LUA) examples/app.lua 8080

bench: all
	bench/tcp_echo

# libFuzzer targets (clang): each runs for FUZZ_SECONDS on a scratch copy of its corpus.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := http_request ws_frames resp resp_diff
FUZZ_FLAGS   := -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
fuzz: deps $(patsubst %,build/fuzz/%,$(FUZZ_TARGETS))
	@set -e; for t in $(FUZZ_TARGETS); do \
	  corpus=$(CURDIR)/build/fuzz/corpus-$$t; mkdir -p $$corpus; \
	  seeds=fuzz/corpus/$${t%%_*}; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
	  log=build/fuzz/$$t.log; \
	  if build/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -max_len=16384 -timeout=10 \
	    -artifact_prefix=build/fuzz/ -print_final_stats=1 $$corpus $$seeds >$$log 2>&1; then \
	    tail -n 12 $$log; \
	  else \
	    tail -n 60 $$log; echo "fuzz: $$t FAILED (the input is in build/fuzz/, the log in $$log)"; exit 1; \
	  fi; \
	done

build/fuzz/%: fuzz/%.c $(SRC) $(HDR)
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) -std=gnu11 $(LUA_CFLAGS) $(LLHTTP_CFLAGS) -o $@ $< $(SRC) $(LLHTTP_SRC) -llua5.4 -lssl -lcrypto -lz -lpthread

# the differential target against hiredis 0.14's reader: the parser alone, and libhiredis
build/fuzz/resp_diff: fuzz/resp_diff.c src/resp.c src/resp.h
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) -std=gnu11 -o $@ fuzz/resp_diff.c src/resp.c -lhiredis

install:
	$(LUAROCKS) --lua-version 5.4 make moonwire-scm-1.rockspec

clean:
	rm -rf build build-asan
