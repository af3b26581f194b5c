-- moonwire's hello server for bench/http_hello: the handler of examples/hello.lua
-- (same body, same content-type), on 127.0.0.1 and port 0 by default.
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' \
--     lua5.4 bench/http_hello.d/hello_server.lua [host] [port] [idle_timeout]
-- Prints "listening on http://HOST:PORT/". idle_timeout (seconds, default 5 as in
-- the server) is raised by the idle-connection measurement, which holds
-- keep-alive connections for longer than 5 s. SIGTERM/SIGINT stop it.
local http = require "moonwire.http"

local host = arg[1] or "127.0.0.1"
local port = tonumber(arg[2] or 0)
local idle = tonumber(arg[3] or 5)

http.serve{
  host = host,
  port = port,
  timeouts = { idle = idle },
  on_listen = function(srv)
    print(("listening on http://%s:%d/"):format(srv.host, srv.port))
    io.stdout:flush()
  end,
  handler = function(_, res)
    res:header("content-type", "text/plain")
    res:send("hello, world\n")
  end,
}
