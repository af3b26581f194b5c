-- moonwire's fan-out server for bench/fanout: one process (no workers), moonwire.pubsub on
-- the Redis given. Two kinds of WebSocket connection:
--   /sub?t=TOPIC  a subscriber: ws:join(TOPIC), then nothing (a message handler that ignores
--                 what arrives, so the connection holds no task)
--   /pub          a publisher: every message it sends is published on the topic named by its
--                 first word (`ps:publish(topic, msg)`: delivered to this process's members at
--                 once, and through Redis to every other process's)
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' \
--     lua5.4 bench/fanout.d/server.lua HOST PORT REDIS_URL
-- Prints "listening on ws://HOST:PORT/". SIGTERM/SIGINT stop it.
local http = require "moonwire.http"
local pubsub = require "moonwire.pubsub"

local host = arg[1] or "127.0.0.1"
local port = tonumber(arg[2] or 0)
local redis_url = assert(arg[3], "usage: server.lua HOST PORT REDIS_URL")

pubsub.configure { redis = redis_url }

local function ignore() end

local function publish(_, msg)
  local topic = msg:match("^(%S+) ")
  if not topic then return end
  local ok, err = pubsub.default():publish(topic, msg)
  if not ok then io.stderr:write("fanout server: publish: ", tostring(err), "\n") end
end

http.serve{
  host = host,
  port = port,
  on_listen = function(srv)
    print(("listening on ws://%s:%d/"):format(srv.host, srv.port))
    io.stdout:flush()
  end,
  handler = function(req)
    local ws = req:websocket()
    if not ws then return end          -- refused: the answer is already sent
    local topic = req.target:match("^/sub%?t=([^&]+)")
    if topic then
      ws:join(topic)
      ws:on("message", ignore)
    else
      ws:on("message", publish)
    end
  end,
}
