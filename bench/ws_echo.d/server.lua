-- moonwire's WebSocket echo server for bench/ws_echo: every path upgrades
-- (`req:websocket()`, default options) and echoes each message with its type
-- until the peer closes. STYLE (the third argument):
--   "moonwire" (default): a message handler, `ws:on("message", fn)`; the
--       handler returns and an idle connection holds no task
--   "task": a receiving task per connection, `for msg, kind in ws:messages()`
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' \
--     lua5.4 bench/ws_echo.d/server.lua [host] [port] [style]
-- (default 127.0.0.1 and port 0). Prints "listening on ws://HOST:PORT/".
-- SIGTERM/SIGINT stop it.
local http = require "moonwire.http"

local host = arg[1] or "127.0.0.1"
local port = tonumber(arg[2] or 0)
local style = arg[3] or "moonwire"
assert(style == "moonwire" or style == "task", "style: moonwire or task")

local function echo(ws, msg, kind) ws:send(msg, kind) end

http.serve{
  host = host,
  port = port,
  on_listen = function(srv)
    print(("listening on ws://%s:%d/"):format(srv.host, srv.port))
    io.stdout:flush()
  end,
  handler = style == "task" and function(req)
    local ws = req:websocket()
    if not ws then return end          -- refused: the answer is already sent
    for msg, kind in ws:messages() do ws:send(msg, kind) end
  end or function(req)
    local ws = req:websocket()
    if ws then ws:on("message", echo) end
  end,
}
