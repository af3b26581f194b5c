-- TCP echo server.
--
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' \
--     lua5.4 examples/tcp_echo.lua [host] [port]
--
-- Defaults: 127.0.0.1 8080 (port 0 picks a free port). Prints
-- "listening on HOST:PORT" once it listens; SIGINT/SIGTERM stop it cleanly.
local mw = require "moonwire"

local host = arg[1] or "127.0.0.1"
local port = math.tointeger(tonumber(arg[2] or "8080"))
if not port or port < 0 or port > 65535 then
  io.stderr:write("usage: lua5.4 examples/tcp_echo.lua [host] [port]\n")
  os.exit(2)
end

-- One task per connection: echo whatever arrives until the peer closes.
local function echo(sock)
  local s <close> = sock
  while true do
    local data = s:recv()
    if not data then return end          -- closed, reset or cancelled (mw.stop)
    if not s:write(data) then return end -- EPIPE / ECONNRESET
  end
end

mw.run(function()
  local listener, err = mw.tcp.listen{ host = host, port = port }
  if not listener then
    io.stderr:write(("tcp_echo: cannot listen on %s:%d: %s\n"):format(host, port, err))
    os.exit(1)
  end

  local stopping = false
  local function stop()
    if stopping then return end
    stopping = true
    listener:close()   -- wakes the accept below with nil, "closed"
    mw.stop()          -- cancels the connection tasks (their sockets close)
  end
  mw.signal("SIGINT", stop)
  mw.signal("SIGTERM", stop)

  local h, p = listener:getsockname()
  if h:find(":", 1, true) then h = "[" .. h .. "]" end
  io.stdout:write(("listening on %s:%d\n"):format(h, p))
  io.stdout:flush()

  while not stopping do
    local sock, aerr, code = listener:accept()
    if sock then
      mw.spawn(echo, sock)
    elseif code == "closed" or code == "cancelled" then
      break
    else
      -- EMFILE and the like: say so and back off instead of spinning.
      io.stderr:write(("tcp_echo: accept: %s\n"):format(aerr))
      mw.sleep(0.1)
    end
  end
end)
