-- The smallest HTTP server: hello world on http://127.0.0.1:8080/
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' lua5.4 examples/hello.lua [port]
local http = require "moonwire.http"

http.serve{
  host = "127.0.0.1",
  port = tonumber(arg and arg[1]) or 8080,
  on_listen = function(srv) print(("listening on http://%s:%d/"):format(srv.host, srv.port)) io.stdout:flush() end,
  handler = function(_, res)
    res:header("content-type", "text/plain")
    res:send("hello, world\n")
  end,
}
