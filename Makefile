# moonwire build. `make` builds build/moonwire/core.so; `make test` runs the suite against
# the build tree; `make test-asan` does the same with an ASan+UBSan build; `make rock` packs
# the source rock of the release (`make dist` the archive it holds).
VERSION   := 0.1.0
LUA       ?= lua5.4
BUSTED    ?= busted
LUAROCKS  ?= luarocks
PKG       ?= pkg-config
CC        ?= cc

LUA_INCDIR ?=
LUA_CFLAGS := $(if $(LUA_INCDIR),-I$(LUA_INCDIR),$(shell $(PKG) --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4))
# OpenSSL and zlib from the usual places; LuaRocks passes its external-dependency dirs.
EXT_CFLAGS := $(foreach d,$(sort $(OPENSSL_INCDIR) $(ZLIB_INCDIR) $(NGHTTP2_INCDIR)),-I$(d))
EXT_LIBS   := $(foreach d,$(sort $(OPENSSL_LIBDIR) $(ZLIB_LIBDIR) $(NGHTTP2_LIBDIR) $(PQ_LIBDIR)),-L$(d))
# llhttp: a system libllhttp when pkg-config knows one, else the C sources Debian's
# node-llhttp ships (compiled into the module; never copied into this repository).
# Targets that install packages first (demo, test, fuzz) build through a recursive make, so
# this is read after the packages are there; a build that finds neither stops (llhttp-check).
LLHTTP_PC := $(shell $(PKG) --exists libllhttp 2>/dev/null && echo yes)
ifeq ($(LLHTTP_PC),yes)
  LLHTTP_CFLAGS := $(shell $(PKG) --cflags libllhttp)
  LLHTTP_LIBS   := $(shell $(PKG) --libs libllhttp)
  LLHTTP_SRC    :=
  LLHTTP_FOUND  := libllhttp (pkg-config)
else
  LLHTTP_DIR    ?= /usr/share/llhttp
  LLHTTP_INCDIR ?= $(LLHTTP_DIR)/../include/llhttp
  LLHTTP_CFLAGS := -I$(LLHTTP_INCDIR) -DLLHTTP_STRICT_MODE=1
  LLHTTP_LIBS   :=
  LLHTTP_SRC    := $(wildcard $(LLHTTP_DIR)/llhttp.c $(LLHTTP_DIR)/api.c $(LLHTTP_DIR)/http.c)
  LLHTTP_FOUND  := $(if $(and $(word 3,$(LLHTTP_SRC)),$(wildcard $(LLHTTP_INCDIR)/llhttp.h)),$(LLHTTP_DIR))
endif

# libpq (moonwire.pg): its include directory from pg_config or pkg-config when present,
# else Debian's place (so parsing this file never needs libpq-dev installed yet)
PQ_INCDIR ?= $(shell pg_config --includedir 2>/dev/null || $(PKG) --variable=includedir libpq 2>/dev/null)
PQ_CFLAGS := -I$(if $(PQ_INCDIR),$(PQ_INCDIR),/usr/include/postgresql)

WARN      := -Wall -Wextra -Wshadow -Wno-unused-parameter
CFLAGS    ?= -O2 -g
ALL_CFLAGS = -std=gnu11 -fPIC $(WARN) $(CFLAGS) $(LUA_CFLAGS) $(EXT_CFLAGS) $(LLHTTP_CFLAGS) $(PQ_CFLAGS) -fvisibility=hidden
LIBS       = $(LLHTTP_LIBS) $(EXT_LIBS) -lpq -lnghttp2 -lssl -lcrypto -lz -lm -lpthread

SRC := $(wildcard src/*.c)
HDR := $(wildcard src/*.h)

BUILD ?= build
OBJ := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(SRC)) $(patsubst $(LLHTTP_DIR)/%.c,$(BUILD)/obj/llhttp_%.o,$(LLHTTP_SRC))
SO  := $(BUILD)/moonwire/core.so

.PHONY: all test test-asan lint demo install clean deps deps-build test-deps bench fuzz fuzz-run \
	llhttp-check dist rock check-rock

all: $(SO)

# Without llhttp the module would load nowhere (undefined llhttp_* symbols at require):
# stop before compiling anything and say what to install.
llhttp-check:
ifeq ($(LLHTTP_FOUND),)
	@echo "moonwire: llhttp not found: no libllhttp known to pkg-config, and no llhttp.c, api.c, http.c in $(LLHTTP_DIR) with llhttp.h in $(LLHTTP_INCDIR)." >&2
	@echo "moonwire: install llhttp: Debian/Ubuntu: apt-get install node-llhttp (or scripts/install-deps build); Fedora: dnf install llhttp-devel; Alpine: apk add llhttp-dev;" >&2
	@echo "moonwire: or point LLHTTP_DIR at a directory holding llhttp's C sources (LLHTTP_INCDIR at llhttp.h)." >&2
	@exit 1
endif

# objects depend on this file too: changed flags rebuild them
$(BUILD)/obj/%.o: src/%.c $(HDR) Makefile | $(BUILD)/obj llhttp-check
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

# third-party sources: no warnings of ours
$(BUILD)/obj/llhttp_%.o: $(LLHTTP_DIR)/%.c Makefile | $(BUILD)/obj llhttp-check
	$(CC) -std=gnu11 -fPIC $(CFLAGS) $(LLHTTP_CFLAGS) -w -c -o $@ $<

$(BUILD)/obj:
	mkdir -p $@ $(BUILD)/moonwire

# linked under a temporary name: a module with llhttp compiled in must define every llhttp_*
# symbol itself (one left undefined would fail at require, not here)
$(SO): $(OBJ) | llhttp-check
	$(CC) -shared $(CFLAGS) -Wl,-z,nodelete -o $@.tmp $(OBJ) $(LIBS)
	@if [ -z "$(LLHTTP_LIBS)" ] && nm -D --undefined-only $@.tmp | grep -q ' llhttp_'; then \
	  echo "moonwire: $@ leaves llhttp_* symbols undefined (llhttp sources not compiled in)" >&2; \
	  rm -f $@.tmp; exit 1; fi
	mv -f $@.tmp $@

# the packages (Debian/Ubuntu); the specs put a stand-in here
INSTALL_DEPS ?= scripts/install-deps
deps:
	@$(INSTALL_DEPS)

# deps, then the module. A recursive make: this make read its llhttp settings before deps
# ran, so on a fresh machine it would link a module without llhttp.
deps-build: deps
	@$(MAKE) --no-print-directory all

# the suite also drives real peers: node's ws (npm), headless chromium
test-deps: deps
	@scripts/install-peers

# The suite: busted on spec/ against the build tree; prints "N passed, N failed".
test: test-deps deps-build
	@scripts/run-tests $(BUILD)

ASAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
test-asan: test-deps
	$(MAKE) BUILD=build-asan CFLAGS="$(ASAN_FLAGS)" all
	@MW_ASAN=1 scripts/run-tests build-asan

lint: deps
	luacheck -q lua spec examples bench
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability,performance \
	  --inline-suppr --suppress=missingIncludeSystem --suppress=toomanyconfigs $(LUA_CFLAGS) $(PQ_CFLAGS) src/
	@# h2.c reaches its session through sess(c) only (an idle one may be stowed: h2mem.h); the
	@# pointer itself may be tested or set
	@if grep -n -- '->ngs' src/h2.c | grep -v -E '!(st->)?c->ngs\b|&& (st->)?c->ngs\)|(st->)?c->ngs &&|c->ngs = NULL|server_new3\(&c->ngs|return c->ngs;'; then \
	  echo "src/h2.c: use sess(c), not ->ngs (a stowed session must be put back first)"; exit 1; fi

demo: deps-build
	LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(BUILD)/?.so;;" $(LUA) examples/app.lua 8080

bench: all
	bench/tcp_echo

# libFuzzer targets (clang): each runs for FUZZ_SECONDS on a scratch copy of its corpus.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := http_request ws_frames h2_frames resp resp_diff
FUZZ_FLAGS   := -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
fuzz: deps
	@$(MAKE) --no-print-directory fuzz-run

fuzz-run: $(patsubst %,build/fuzz/%,$(FUZZ_TARGETS))
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

build/fuzz/%: fuzz/%.c $(SRC) $(HDR) | llhttp-check
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) -std=gnu11 $(LUA_CFLAGS) $(EXT_CFLAGS) $(LLHTTP_CFLAGS) $(PQ_CFLAGS) -o $@ $< $(SRC) $(LLHTTP_SRC) $(LLHTTP_LIBS) $(EXT_LIBS) -llua5.4 -lpq -lnghttp2 -lssl -lcrypto -lz -lpthread

# the differential target against hiredis 0.14's reader: the parser alone, and libhiredis
build/fuzz/resp_diff: fuzz/resp_diff.c src/resp.c src/resp.h
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) -std=gnu11 -o $@ fuzz/resp_diff.c src/resp.c -lhiredis

install:
	$(LUAROCKS) --lua-version 5.4 make moonwire-scm-1.rockspec

# Release: `make dist` makes moonwire-$(VERSION).tar.gz (git archive of the tracked files) and
# writes its md5 into the release rockspec; `make rock` zips both into the source rock, as
# `luarocks pack` would, without fetching anything. scripts/check-rock installs and tries it.
ROCKSPEC := rockspecs/moonwire-$(VERSION)-1.rockspec
SRC_ROCK := moonwire-$(VERSION)-1.src.rock

dist:
	@scripts/dist $(VERSION)

rock: dist
	@rm -rf build/rock $(SRC_ROCK) && mkdir -p build/rock
	@cp $(ROCKSPEC) moonwire-$(VERSION).tar.gz build/rock/
	@cd build/rock && zip -q -X ../../$(SRC_ROCK) moonwire-$(VERSION)-1.rockspec moonwire-$(VERSION).tar.gz
	@echo "rock: $(SRC_ROCK)"

check-rock: rock
	@scripts/check-rock $(SRC_ROCK)

clean:
	rm -rf build build-asan
