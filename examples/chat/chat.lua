-- Chat over WebSocket: installs GET /chat (the page) and GET /chat/ws (the socket) on a
-- router. Every message a client sends is broadcast to everyone connected.
--   standalone: LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' lua5.4 examples/chat/chat.lua [port]
local mw = require "moonwire"
local required_as = ...   -- "chat" when required as a module, else the script's first argument

local here = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "."

local M = {}

function M.install(app)
  local clients = {}          -- ws -> name
  local list = {}             -- the same, as an array for broadcast

  local function roster()
    list = {}
    for ws in pairs(clients) do list[#list + 1] = ws end
  end

  local function say(text)
    mw.websocket.broadcast(list, text)
  end

  app:get("/chat", function(_, res)
    res:header("content-type", "text/html; charset=utf-8")
    res:sendfile(here .. "/index.html")
  end)

  app:get("/chat/ws", function(req)
    local ws = req:websocket{ protocols = { "chat" }, ping_interval = 20, max_message = 64 * 1024 }
    if not ws then return end
    local name = (req:query().name or ""):gsub("[^%w _-]", ""):sub(1, 24)
    if name == "" then name = "guest" .. math.random(1000, 9999) end
    clients[ws] = name
    roster()
    say(("* %s joined (%d online)"):format(name, #list))
    for msg in ws:messages() do
      if #msg > 0 then say(name .. ": " .. msg:sub(1, 2000)) end
    end
    clients[ws] = nil
    roster()
    say(("* %s left (%d online)"):format(name, #list))
  end)
  return app
end

-- run standalone
if required_as ~= "chat" then
  local http = require "moonwire.http"
  local app = M.install(http.router())
  http.serve{ host = "127.0.0.1", port = tonumber(arg and arg[1]) or 8080, handler = app,
    on_listen = function(srv)
      print(("chat on http://%s:%d/chat"):format(srv.host, srv.port))
      io.stdout:flush()
    end }
end

return M
