-- moonwire's server for bench/http2_hello: one process, two listeners with the same
-- handler (`res:send("hello world")`, content-type text/plain): cleartext (HTTP/2 by prior
-- knowledge, HTTP/1.1 otherwise) and TLS (h2 by ALPN, http/1.1 otherwise).
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' \
--     lua5.4 bench/http2_hello.d/server.lua CERT KEY [host] [idle_timeout]
-- Both on port 0; prints "listening on http://HOST:PORT/" then
-- "listening on https://HOST:PORT/". idle_timeout (seconds, default 5 as in the server) is
-- raised by the idle-connection measurement. MW_PARK_HPACK=1 in the environment turns on the
-- http2 option park_hpack (docs/http2.md). SIGTERM/SIGINT stop it.
local mw = require "moonwire"
local http = require "moonwire.http"

local cert, key = arg[1], arg[2]
assert(cert and key, "usage: server.lua CERT KEY [host] [idle_timeout]")
local host = arg[3] or "127.0.0.1"
local idle = tonumber(arg[4] or 5)

local function handler(_, res)
  res:header("content-type", "text/plain")
  res:send("hello world")
end

local h2 = { park_hpack = os.getenv("MW_PARK_HPACK") == "1" }

mw.run(function()
  local plain = assert(http.server{ host = host, port = 0, handler = handler, timeouts = { idle = idle },
    http2 = h2 })
  local tls = assert(http.server{ host = host, port = 0, handler = handler, timeouts = { idle = idle },
    http2 = h2, tls = { cert = cert, key = key } })
  print(("listening on http://%s:%d/"):format(plain.host, plain.port))
  print(("listening on https://%s:%d/"):format(tls.host, tls.port))
  io.stdout:flush()
  local function stop() plain:close(); tls:close() end
  mw.signal("SIGTERM", stop)
  mw.signal("SIGINT", stop)
  plain._accept:join()
  tls._accept:join()
  plain:close(); tls:close()
  mw.signal("SIGTERM", nil)
  mw.signal("SIGINT", nil)
end)
