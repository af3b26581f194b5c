-- WebSocket fan-out across processes (moonwire.pubsub + ws:join): servers run in child lua5.4
-- processes with workers = 2 (http.serve forks), this process holds the WebSocket clients.
--  * 2 servers x 2 workers sharing one redis-server (spec/redis_server.lua, started for this
--    file, stopped in teardown): every client gets every message exactly once, and the
--    messages of each publisher in the order it published them.
--  * 1 server x 2 workers without Redis: the workers bus reaches the clients of both workers.
--  * headless Chromium: two pages on two chat demo servers (examples/chat, workers = 2 each)
--    sharing the Redis talk to each other (spec/peers/chat_browser.js; screenshot in build/).

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local websocket = require "moonwire.websocket"
local server = require "spec.redis_server"

local readfile = helper.readfile
local procs = require "spec.peers.procs"
local quote = procs.quote

local redis_srv
setup(function() redis_srv = server.start() end)
teardown(function() if redis_srv then redis_srv.stop() end end)

-- Starts a chat-like server (workers = 2) in the background: every connection joins "room",
-- is told "joined <pid>", and every message it sends is published on "room".
local function start_server(redis_url)
  local base = os.tmpname()
  local script, log = base .. ".lua", base .. ".log"
  local f = assert(io.open(script, "w"))
  f:write(("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath))
  f:write(([[
local core = require "moonwire.core"
local http = require "moonwire.http"
local pubsub = require "moonwire.pubsub"
pubsub.configure { redis = %s, backoff_min = 0.05, backoff_max = 0.5 }
http.serve{ host = "127.0.0.1", port = 0, workers = 2,
  on_listen = function(info)
    io.stdout:write("listening ", info.port, " ", info.pid, "\n")
    io.stdout:flush()
  end,
  handler = function(req)
    local ws = req:websocket{ send_queue = 100000 }
    if not ws then return end
    ws:join("room")
    ws:send("joined " .. core.getpid())
    for msg in ws:messages() do
      local ok, err = pubsub.default():publish("room", msg)
      if not ok then io.stderr:write("publish: ", tostring(err), "\n") end
    end
  end }
]]):format(redis_url and ("%q"):format(redis_url) or "nil"))
  f:close()
  local preload = os.getenv("MW_ASAN_PRELOAD")
  local env = preload and ("env LD_PRELOAD=" .. preload .. " ") or ""
  assert(os.execute(("(%stimeout -k 1 60 lua5.4 %s >%s 2>&1 &)"):format(env, script, log)))
  local port, pid
  for _ = 1, 500 do
    port, pid = (readfile(log) or ""):match("listening (%d+) (%d+)")
    if port then break end
    mw.sleep(0.01)
  end
  assert(port, "the server did not start: " .. (readfile(log) or ""))
  return { port = tonumber(port), pid = tonumber(pid), log = log, script = script,
    stop = function()
      os.execute("kill -TERM " .. pid .. " 2>/dev/null")
      for _ = 1, 100 do
        if os.execute("kill -0 " .. pid .. " 2>/dev/null") ~= true then break end
        os.execute("sleep 0.02")
      end
      os.execute("pkill -9 -P " .. pid .. " 2>/dev/null; kill -9 " .. pid .. " 2>/dev/null")
      os.remove(log)
      os.remove(script)
    end }
end

-- Connects n clients to each server; each records what it receives.
local function clients(servers, n)
  local list = {}
  for _, s in ipairs(servers) do
    for _ = 1, n do
      local ws = assert(websocket.connect("ws://127.0.0.1:" .. s.port .. "/"))
      local c = { ws = ws, got = {}, pid = nil }
      local first = assert(ws:receive())
      c.pid = tonumber(first:match("^joined (%d+)$"))
      mw.spawn(function()
        for msg in ws:messages() do c.got[#c.got + 1] = msg end
      end)
      list[#list + 1] = c
    end
  end
  return list
end

local function wait_for(cond, limit, what)
  local deadline = mw.now() + (limit or 10)
  while not cond() do
    if mw.now() > deadline then error("timed out waiting for " .. (what or "condition"), 2) end
    mw.sleep(0.01)
  end
end

-- Warm-up: messages from client 1 until every client saw one (every worker is subscribed).
local function warm_up(list)
  local function all_saw()
    for _, c in ipairs(list) do
      local seen = false
      for _, m in ipairs(c.got) do if m:find("^warm") then seen = true break end end
      if not seen then return false end
    end
    return true
  end
  local i = 0
  while not all_saw() do
    i = i + 1
    assert(i < 500, "the warm-up never reached every client")
    list[1].ws:send("warm" .. i)
    mw.sleep(0.02)
  end
  for _, c in ipairs(list) do c.got = {} end
end

-- Every client got every publisher's messages exactly once, each publisher's in order.
local function check_all(list, publishers, n)
  for ci, c in ipairs(list) do
    local next_of = {}
    local count = 0
    for _, m in ipairs(c.got) do
      local p, i = m:match("^p(%d+):(%d+)$")
      if p then
        p, i = tonumber(p), tonumber(i)
        assert.equal((next_of[p] or 1), i, ("client %d: publisher %d out of order or twice"):format(ci, p))
        next_of[p] = i + 1
        count = count + 1
      end
    end
    assert.equal(#publishers * n, count, "client " .. ci)
  end
end

describe("WebSocket fan-out", function()
  it("2 servers x 2 workers sharing Redis: every client gets every message once, per-publisher order kept", function()
    run(function()
      local a = start_server(redis_srv.url)
      local b = start_server(redis_srv.url)
      finally(function() a.stop() b.stop() end)
      local list = clients({ a, b }, 12)
      local pids = {}
      for _, c in ipairs(list) do pids[c.pid] = true end
      local nproc = 0
      for _ in pairs(pids) do nproc = nproc + 1 end
      assert.is_true(nproc >= 3, "clients reached only " .. nproc .. " worker processes")
      warm_up(list)
      -- 4 publishers (2 on each server), 100 messages each, all at once
      local publishers = { list[1], list[2], list[13], list[14] }
      local N = 100
      local tasks = {}
      for p, c in ipairs(publishers) do
        tasks[p] = mw.spawn(function()
          for i = 1, N do assert(c.ws:send(("p%d:%d"):format(p, i))) end
        end)
      end
      for _, t in ipairs(tasks) do t:join() end
      wait_for(function()
        for _, c in ipairs(list) do if #c.got < #publishers * N then return false end end
        return true
      end, 15, "every delivery")
      mw.sleep(0.2)    -- anything extra (a duplicate) would arrive by now
      check_all(list, publishers, N)
      for _, c in ipairs(list) do c.ws:close() end
    end, 40)
  end)

  it("1 server x 2 workers without Redis: the workers bus reaches both workers' clients", function()
    run(function()
      local a = start_server(nil)
      finally(function() a.stop() end)
      local list = clients({ a }, 12)
      local pids = {}
      for _, c in ipairs(list) do pids[c.pid] = true end
      local nproc = 0
      for _ in pairs(pids) do nproc = nproc + 1 end
      assert.equal(2, nproc, "clients reached only one worker")
      warm_up(list)
      local publishers, N = { list[1], list[7] }, 100
      local tasks = {}
      for p, c in ipairs(publishers) do
        tasks[p] = mw.spawn(function()
          for i = 1, N do assert(c.ws:send(("p%d:%d"):format(p, i))) end
        end)
      end
      for _, t in ipairs(tasks) do t:join() end
      wait_for(function()
        for _, c in ipairs(list) do if #c.got < #publishers * N then return false end end
        return true
      end, 15, "every delivery")
      mw.sleep(0.2)
      check_all(list, publishers, N)
      for _, c in ipairs(list) do c.ws:close() end
    end, 30)
  end)

  it("Chromium: two pages on two chat servers sharing Redis talk to each other; a screenshot", function()
    assert(procs.exists(procs.CHROMIUM) and procs.exists(procs.peers .. "/node_modules/ws/package.json"),
      "Chromium or node's ws is missing: run scripts/install-peers")
    run(function()
      local function chat_server()
        local log = os.tmpname()
        -- (procs.lua_env: this build tree, and the ASan runtime under make test-asan)
        local cmd = ("(%s MOONWIRE_REDIS=%s MOONWIRE_WORKERS=2 timeout -k 1 60 lua5.4 %s 0 >%s 2>&1 &)")
          :format(procs.lua_env(), quote(redis_srv.url), quote(procs.root .. "/examples/chat/chat.lua"), quote(log))
        assert(os.execute(cmd))
        local port, pid
        for _ = 1, 500 do
          port, pid = (readfile(log) or ""):match("chat on http://127.0.0.1:(%d+)/chat %(supervisor pid (%d+)%)")
          if port then break end
          mw.sleep(0.01)
        end
        assert(port, "the chat server did not start: " .. (readfile(log) or ""))
        return { port = port, log = log, pid = tonumber(pid) }
      end
      local s1, s2 = chat_server(), chat_server()
      finally(function()
        for _, s in ipairs { s1, s2 } do
          os.execute("kill -TERM " .. s.pid .. " 2>/dev/null")   -- the supervisor stops its workers
          os.remove(s.log)
        end
      end)
      local shot = procs.root .. "/build/chat-redis-screenshot.png"
      os.remove(shot)
      local code, out, err = procs.shell(("env MW_CHROMIUM=%s %s %s %s %s %s"):format(quote(procs.CHROMIUM), procs.NODE,
        quote(procs.peers .. "/chat_browser.js"), quote("http://127.0.0.1:" .. s1.port), quote(shot),
        quote("http://127.0.0.1:" .. s2.port)), 50)
      local r = procs.kv(out)
      local context = ("\nchat_browser.js (exit %s) said:\n%s\n%s"):format(tostring(code), out, err)
      assert.equal(0, code, "the browser run failed" .. context)
      assert.equal("1", r.done, context)
      local long = "alice: a longer one: " .. ("the quick brown fox jumps over the lazy dog; "):rep(8):sub(1, -2)
      assert.equal("* bob joined (2 online) | alice: hello from alice ✓ | " .. long, r["bob.log"], context)
      assert.equal("* alice joined (1 online) | * bob joined (2 online) | alice: hello from alice ✓ | " ..
        long .. " | * bob left (1 online)", r["alice.log"], context)
      assert.is_truthy(readfile(shot), "no screenshot")
    end, 60)
  end)
end)
