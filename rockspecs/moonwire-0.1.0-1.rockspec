rockspec_format = "3.0"
package = "moonwire"
version = "0.1.0-1"
-- the archive `make dist` makes (git archive of the tracked files, prefix moonwire-0.1.0/);
-- `make rock` packs it with this file into moonwire-0.1.0-1.src.rock, which installs offline
source = {
  url = "https://github.com/moonwire-lua/moonwire/releases/download/v0.1.0/moonwire-0.1.0.tar.gz",
  md5 = "76c60c086607e9750fcc61e1e630832f",
  dir = "moonwire-0.1.0",
}
description = {
  summary = "Network programming in plain Lua: event loop, tasks, TCP/Unix sockets, HTTP, WebSocket, TLS",
  detailed = [[
moonwire is a Lua 5.4 extension module written in C: an epoll event loop and a coroutine
scheduler under straight-line Lua code. sock:read() parks only the calling task.
Needs Linux (epoll, signalfd, eventfd), OpenSSL, zlib and llhttp.
]],
  homepage = "https://github.com/moonwire-lua/moonwire",
  license = "MIT",
  labels = { "networking", "async", "http", "websocket" },
}
-- the core is built on epoll, signalfd and eventfd
supported_platforms = { "linux" }
dependencies = {
  "lua >= 5.4, < 5.5",
}
-- llhttp is found by the Makefile, not here: a system libllhttp known to pkg-config, else the
-- C sources Debian's node-llhttp ships (/usr/share/llhttp; LLHTTP_DIR in the environment
-- points elsewhere). Without either the build stops and says what to install.
external_dependencies = {
  OPENSSL = { header = "openssl/ssl.h", library = "ssl" },
  ZLIB = { header = "zlib.h", library = "z" },
  NGHTTP2 = { header = "nghttp2/nghttp2.h", library = "nghttp2" },
  PQ = { library = "pq" },   -- (its header is under postgresql/ on Debian, not on Fedora)
}
build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    OPENSSL_INCDIR = "$(OPENSSL_INCDIR)",
    OPENSSL_LIBDIR = "$(OPENSSL_LIBDIR)",
    ZLIB_INCDIR = "$(ZLIB_INCDIR)",
    ZLIB_LIBDIR = "$(ZLIB_LIBDIR)",
    NGHTTP2_INCDIR = "$(NGHTTP2_INCDIR)",
    NGHTTP2_LIBDIR = "$(NGHTTP2_LIBDIR)",
    PQ_LIBDIR = "$(PQ_LIBDIR)",
  },
  install_pass = false,
  install = {
    lua = {
      ["moonwire"] = "lua/moonwire/init.lua",
      ["moonwire.channel"] = "lua/moonwire/channel.lua",
      ["moonwire.cli"] = "lua/moonwire/cli.lua",
      ["moonwire.url"] = "lua/moonwire/url.lua",
      ["moonwire.opts"] = "lua/moonwire/opts.lua",
      ["moonwire.http"] = "lua/moonwire/http/init.lua",
      ["moonwire.http.server"] = "lua/moonwire/http/server.lua",
      ["moonwire.http.request"] = "lua/moonwire/http/request.lua",
      ["moonwire.http.response"] = "lua/moonwire/http/response.lua",
      ["moonwire.http.router"] = "lua/moonwire/http/router.lua",
      ["moonwire.http.static"] = "lua/moonwire/http/static.lua",
      ["moonwire.http.mime"] = "lua/moonwire/http/mime.lua",
      ["moonwire.http.workers"] = "lua/moonwire/http/workers.lua",
      ["moonwire.http.client"] = "lua/moonwire/http/client.lua",
      ["moonwire.http.h2"] = "lua/moonwire/http/h2.lua",
      ["moonwire.socket"] = "lua/moonwire/socket.lua",
      ["moonwire.socket.ssl"] = "lua/moonwire/socket/ssl.lua",
      ["moonwire.pg"] = "lua/moonwire/pg.lua",
      ["moonwire.redis"] = "lua/moonwire/redis.lua",
      ["moonwire.redis.subscriber"] = "lua/moonwire/redis/subscriber.lua",
      ["moonwire.pubsub"] = "lua/moonwire/pubsub.lua",
      ["moonwire.pubsub.bus"] = "lua/moonwire/pubsub/bus.lua",
      ["moonwire.websocket"] = "lua/moonwire/websocket.lua",
      ["moonwire.tls"] = "lua/moonwire/tls.lua",
      ["moonwire.bench"] = "lua/moonwire/bench/init.lua",
      ["moonwire.bench.scenario"] = "lua/moonwire/bench/scenario.lua",
      ["moonwire.bench.cli"] = "lua/moonwire/bench/cli.lua",
      ["moonwire.bench.engine"] = "lua/moonwire/bench/engine.lua",
      ["moonwire.bench.h2"] = "lua/moonwire/bench/h2.lua",
      ["moonwire.bench.wrk"] = "lua/moonwire/bench/wrk.lua",
      ["moonwire.bench.serial"] = "lua/moonwire/bench/serial.lua",
      ["moonwire.bench.format"] = "lua/moonwire/bench/format.lua",
      ["moonwire.bench.json"] = "lua/moonwire/bench/json.lua",
      ["moonwire.bench.report"] = "lua/moonwire/bench/report.lua",
      ["moonwire.bench.dist"] = "lua/moonwire/bench/dist.lua",
      ["moonwire.bench.agent"] = "lua/moonwire/bench/agent.lua",
      ["moonwire.bench.coordinator"] = "lua/moonwire/bench/coordinator.lua",
    },
    lib = {
      ["moonwire.core"] = "build/moonwire/core.so",
    },
    bin = {
      moonwire = "bin/moonwire",
    },
  },
}
-- `luarocks test` runs the suite in a source tree (a checkout, or the archive of an unpacked
-- source rock): `make test` installs what the suite needs (Debian/Ubuntu), builds, runs busted
test = {
  type = "command",
  command = "make test",
}
