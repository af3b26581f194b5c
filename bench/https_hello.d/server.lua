-- moonwire's https hello server for bench/https_hello: the handler of
-- examples/hello.lua (same body, same content-type) over TLS.
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' \
--     lua5.4 bench/https_hello.d/server.lua CERT KEY [host] [port] [idle_timeout]
-- (default 127.0.0.1, port 0, idle 5 s as the server's default). Prints
-- "listening on https://HOST:PORT/". SIGTERM/SIGINT stop it.
local http = require "moonwire.http"

local cert, key = arg[1], arg[2]
assert(cert and key, "usage: server.lua CERT KEY [host] [port] [idle_timeout]")
local host = arg[3] or "127.0.0.1"
local port = tonumber(arg[4] or 0)
local idle = tonumber(arg[5] or 5)

http.serve{
  host = host,
  port = port,
  tls = { cert = cert, key = key },
  timeouts = { idle = idle },
  on_listen = function(srv)
    print(("listening on https://%s:%d/"):format(srv.host, srv.port))
    io.stdout:flush()
  end,
  handler = function(_, res)
    res:header("content-type", "text/plain")
    res:send("hello, world\n")
  end,
}
