-- A small web app: router with parameters, a form post, streaming, static files, and a
-- WebSocket chat at /chat.
--   make demo    (or: LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' lua5.4 examples/app.lua [port])
--   MOONWIRE_REDIS=redis://127.0.0.1:6379 lets servers sharing that Redis chat together.
local http = require "moonwire.http"

local here = (arg and arg[0] or "examples/app.lua"):match("^(.*)/[^/]*$") or "."
local port = tonumber(arg and arg[1]) or 8080

local app = http.router()

-- a tiny request log as middleware
local served = 0
app:use(function(_, _, nxt)
  served = served + 1
  nxt()
end)

local function html_escape(s)
  return (s:gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }))
end

app:get("/hello/:name", function(req, res)
  res:header("content-type", "text/plain; charset=utf-8")
  res:send("hello, " .. req.params.name .. "\n")
end)

local guestbook = {}

app:post("/guestbook", function(req, res)
  local form = req:form()
  local name, text = form and form.name, form and form.message
  if type(name) ~= "string" or name == "" or type(text) ~= "string" then
    res:status(400):header("content-type", "text/plain")
    return res:send("name and message are required\n")
  end
  guestbook[#guestbook + 1] = { name = name:sub(1, 80), text = text:sub(1, 500) }
  res:redirect("/guestbook", 303)
end)

app:get("/guestbook", function(_, res)
  local items = {}
  for i = #guestbook, 1, -1 do
    local e = guestbook[i]
    items[#items + 1] = ("<li><b>%s</b>: %s</li>"):format(html_escape(e.name), html_escape(e.text))
  end
  res:header("content-type", "text/html; charset=utf-8")
  res:send(([[<!doctype html><title>Guestbook</title><h1>Guestbook</h1>
<form method="post" action="/guestbook"><input name="name" placeholder="name">
<input name="message" placeholder="message"><button>Sign</button></form><ul>%s</ul>
<p><a href="/">home</a></p>]]):format(table.concat(items)))
end)

-- a streamed (chunked) response, written piece by piece
app:get("/count/:n", function(req, res)
  local n = math.min(tonumber(req.params.n) or 10, 10000)
  res:header("content-type", "text/plain")
  for i = 1, n do res:write(i .. "\n") end
  res:finish()
end)

app:get("/stats", function(_, res)
  res:header("content-type", "application/json")
  res:send(('{"served":%d}\n'):format(served))
end)

-- a WebSocket echo endpoint (what examples/bench/ws_echo.lua loads)
app:get("/ws", function(req)
  local ws = req:websocket()
  if not ws then return end
  for msg, kind in ws:messages() do ws:send(msg, kind) end
end)

-- the WebSocket chat (examples/chat): /chat and /chat/ws
package.path = here .. "/chat/?.lua;" .. package.path
require("chat").install(app)

app:static("/", here .. "/public")

-- two workers (MOONWIRE_WORKERS); the chat reaches across them (and across servers sharing
-- $MOONWIRE_REDIS). The guestbook and /stats are per worker.
http.serve{
  host = "127.0.0.1", port = port, handler = app, workers = tonumber(os.getenv("MOONWIRE_WORKERS") or "2"),
  on_listen = function(srv)
    print(("moonwire demo on http://%s:%d/  (Ctrl-C to stop)"):format(srv.host, srv.port))
    io.stdout:flush()
  end,
}
