-- Chat over WebSocket: installs GET /chat (the page) and GET /chat/ws (the socket) on a
-- router. Every message a client sends is published on the topic "chat" (moonwire.pubsub),
-- which every connection joined: everyone connected to any worker of any server sharing the
-- Redis ($MOONWIRE_REDIS) gets it.
--   standalone: LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' lua5.4 examples/chat/chat.lua [port]
local pubsub = require "moonwire.pubsub"
local required_as = ...   -- "chat" when required as a module, else the script's first argument

local here = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "."

local M = {}

-- opts.redis (default: $MOONWIRE_REDIS): servers sharing that Redis share the chat. Without
-- it the workers of one server share it (moonwire.pubsub's workers bus).
function M.install(app, opts)
  opts = opts or {}
  local redis_url = opts.redis or os.getenv("MOONWIRE_REDIS")
  if redis_url == "" then redis_url = nil end
  pubsub.configure { redis = redis_url }
  local pool = redis_url and require("moonwire.redis").pool { url = redis_url, size = 2 }
  local here_now = 0       -- this process's members (the count without Redis)

  -- how many are online: a Redis counter shared by every server, else this process's count
  local function online(delta)
    here_now = here_now + delta
    if pool then
      local n = pool:call("INCRBY", "chat:online", delta)
      if n then return n end
    end
    return here_now
  end
  -- whose count it is: without Redis, with sibling workers (the workers bus), this one's only
  local function where()
    if pool or not require("moonwire.pubsub.bus").available() then return "" end
    return " on this worker"
  end

  local function say(text)
    -- delivered here at once; nil, err when it could not reach the other servers (logged)
    local ok, err = pubsub.default():publish("chat", text)
    if not ok then io.stderr:write("chat: publish: ", tostring(err), "\n") end
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
    ws:join("chat")
    say(("* %s joined (%d online%s)"):format(name, online(1), where()))
    for msg in ws:messages() do
      if #msg > 0 then say(name .. ": " .. msg:sub(1, 2000)) end
    end
    -- closed: the connection has left the topic already
    say(("* %s left (%d online%s)"):format(name, online(-1), where()))
  end)
  return app
end

-- run standalone
if required_as ~= "chat" then
  local http = require "moonwire.http"
  local app = M.install(http.router())
  http.serve{ host = "127.0.0.1", port = tonumber(arg and arg[1]) or 8080, handler = app,
    workers = tonumber(os.getenv("MOONWIRE_WORKERS") or "2"),
    on_listen = function(srv)
      print(("chat on http://%s:%d/chat (supervisor pid %s)"):format(srv.host, srv.port, srv.pid or "-"))
      io.stdout:flush()
    end }
end

return M
