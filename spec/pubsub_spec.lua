-- moonwire.pubsub and moonwire.redis.subscriber against a real redis-server (started once for
-- this file by spec/redis_server.lua, stopped in teardown). Several pubsub instances in one
-- process stand for several nodes: each has its own node id and its own Redis connections.
-- Covers: local delivery and bounded handler queues, fan-out between nodes once each and in
-- order, 10,000 topics with join/leave churn (delayed unsubscribe), and the faults: Redis
-- killed mid-stream, restarted (with and without its data), SIGSTOPped, CLIENT KILL TYPE
-- pubsub, a subscriber cut at its output-buffer limit. Intervals are scaled down by options.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local redis = require "moonwire.redis"
local pubsub = require "moonwire.pubsub"
local server = require "spec.redis_server"

local srv
setup(function() srv = server.start() end)
teardown(function()
  if srv then
    os.execute("kill -CONT " .. (srv.pid or 0) .. " 2>/dev/null")
    srv.stop()
  end
end)

local FAST = { backoff_min = 0.05, backoff_max = 0.5, probe_interval = 0.3, probe_timeout = 0.3,
  unsubscribe_delay = 0.2 }

local function node(extra)
  local o = { redis = srv.url }
  for k, v in pairs(FAST) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  local events = {}
  o.on_event = function(name, topic, info) events[#events + 1] = { name, topic, info } end
  local ps = pubsub.new(o)
  ps.events = events
  return ps
end

-- Waits (polling the loop, at most `limit` s) until cond() is true.
local function wait_for(cond, limit, what)
  local deadline = mw.now() + (limit or 5)
  while not cond() do
    if mw.now() > deadline then error("timed out waiting for " .. (what or "condition"), 2) end
    mw.sleep(0.01)
  end
end

local function up(ps) return function() return ps.state == "up" end end

local function count_events(ps, name)
  local n = 0
  for _, e in ipairs(ps.events) do if e[1] == name then n = n + 1 end end
  return n
end

local function admin()
  return assert(redis.connect(srv.url))
end

describe("moonwire.pubsub, local", function()
  it("delivers to this process's handlers at once, in order; a full topic queue drops and counts", function()
    run(function()
      local ps = pubsub.new { queue = 10 }
      local got = {}
      ps:subscribe("t", function(data) got[#got + 1] = data end)
      for i = 1, 5 do assert.is_true(ps:publish("t", "m" .. i)) end
      wait_for(function() return #got == 5 end)
      assert.same({ "m1", "m2", "m3", "m4", "m5" }, got)
      -- a slow handler: 100 messages into a queue of 10
      local slow = {}
      ps:subscribe("slow", function(data) mw.sleep(0.001) slow[#slow + 1] = data end)
      for i = 1, 100 do ps:publish("slow", tostring(i)) end
      wait_for(function() return #slow + ps:topic_stats("slow").drops == 100 end)
      assert.equal(90, ps:topic_stats("slow").drops)
      assert.equal(90, ps.stats.dropped)
      ps:close()
    end)
  end)

  -- Regression (found by a docs review): a message still queued for a topic when its
  -- handler unsubscribed went to a handler that subscribed after it was published.
  it("a handler gets only what was published once it subscribed", function()
    run(function()
      local ps = pubsub.new()
      local a, b = {}, {}
      local ha = ps:subscribe("news", function(data) a[#a + 1] = data end)
      assert.is_true(ps:publish("news", "hello"))
      ha:close()                 -- before the topic's task delivered "hello"
      ps:subscribe("news", function(data) b[#b + 1] = data end)
      assert.is_true(ps:publish("news", "hello2"))
      wait_for(function() return #b == 1 end)   -- (in order: "hello" was drained before)
      assert.same({}, a)
      assert.same({ "hello2" }, b)
      ps:close()
    end)
  end)

  -- Regression (review): a handler closed while the topic's task was delivering to it (by
  -- itself, or by another task while it waited) shifted the live handler list under that
  -- loop: the next handler missed the message, the task died on a nil handler, and the
  -- topic delivered nothing more.
  it("a handler closed while a message is being delivered: the others get every message", function()
    run(function()
      local ps = pubsub.new { bus = false }
      local a, b = {}, {}
      local ha
      ha = ps:subscribe("t", function(data) a[#a + 1] = data ha:close() end)
      ps:subscribe("t", function(data) b[#b + 1] = data end)
      for i = 1, 3 do ps:publish("t", "m" .. i) end
      wait_for(function() return #b == 3 end)
      assert.same({ "m1" }, a)
      assert.same({ "m1", "m2", "m3" }, b)
      -- closed by another task while it waits in its handler
      local gate = mw.channel(1)
      local c, d = {}, {}
      local hc = ps:subscribe("u", function(data) c[#c + 1] = data gate:recv(5) end)
      ps:subscribe("u", function(data) d[#d + 1] = data end)
      ps:publish("u", "n1")
      wait_for(function() return #c == 1 end)
      hc:close()
      gate:send(true)
      ps:publish("u", "n2")
      wait_for(function() return #d == 2 end)
      assert.same({ "n1" }, c)
      assert.same({ "n1", "n2" }, d)
      assert.equal(0, ps.stats.dropped)
      ps:close()
    end)
  end)

  -- A text message that is not UTF-8 would make every WebSocket member close with 1007
  -- (mw.websocket.broadcast raises on it now): the handlers get it, the members do not.
  it("kind text: a message that is not UTF-8 reaches the handlers, no member, and is counted", function()
    run(function()
      local http = require "moonwire.http"
      local ps = pubsub.new()
      local got = {}
      ps:subscribe("room", function(data) got[#got + 1] = data end)
      local joined = mw.channel(1)
      local web = assert(http.server { host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket())
        -- (regression: these raised "attempt to index a number value", "attempt to call a nil value")
        helper.raises("bad argument #2 to 'join' (pubsub instance expected, got number)", ws.join, ws, "room", 5)
        helper.raises("bad argument #2 to 'join' (pubsub instance expected, got table)", ws.join, ws, "room", {})
        assert(ws:join("room", ps))
        joined:send(true)
        for _ in ws:messages() do end
      end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(web.port)))
      assert(joined:recv(5))
      assert.is_true(ps:publish("room", "bad \xff"))
      assert.is_true(ps:publish("room", "good"))
      local msg, kind = ws:receive(5)
      assert.same({ "good", "text" }, { msg, kind })
      wait_for(function() return #got == 2 end)
      assert.same({ "bad \xff", "good" }, got)
      assert.equal(1, ps:topic_stats("room").drops)
      assert.equal(1, ps.stats.dropped)
      ws:close()
      web:close()
      ps:close()
    end)
  end)

  it("raises on misuse, naming the argument", function()
    run(function()
      local ps = pubsub.new()
      assert.has_error(function() ps:publish(1, "x") end, "bad argument #1 to 'publish' (string expected, got number)")
      assert.has_error(function() ps:subscribe("t") end, "bad argument #2 to 'subscribe' (function expected, got nil)")
      ps:close()
    end)
  end)

  -- Regression: these failed with "attempt to index a nil value" (join, leave, unsubscribe of
  -- nil), returned nil silently (join of a table), or failed later, elsewhere: a string queue
  -- at the first publish, a string unsubscribe_delay in the sweeper task (idle topics were
  -- never forgotten afterwards), a topic over 65535 bytes inside string.pack.
  it("raises on a bad argument or option, naming it", function()
    run(function()
      local ps = pubsub.new { bus = false }
      helper.raises("bad argument #1 to 'join' (WebSocket expected, got nil)", ps.join, ps, nil, "room")
      helper.raises("bad argument #1 to 'join' (WebSocket expected, got table)", ps.join, ps, {}, "room")
      helper.raises("bad argument #1 to 'leave' (WebSocket expected, got nil)", ps.leave, ps, nil, "room")
      helper.raises("bad argument #1 to 'unsubscribe' (subscription handle expected, got nil)",
        ps.unsubscribe, ps, nil)
      helper.raises("bad argument #1 to 'unsubscribe' (subscription handle expected, got table)",
        ps.unsubscribe, ps, { topic = "t" })
      local long = ("x"):rep(65536)
      helper.raises("bad argument #1 to 'publish' (topic longer than 65535 bytes)", ps.publish, ps, long, "d")
      helper.raises("bad argument #1 to 'subscribe' (topic longer than 65535 bytes)", ps.subscribe, ps, long,
        function() end)
      assert.is_true(ps:publish(("x"):rep(65535), "d"))          -- the longest topic is fine
      -- (regression: these answered 0 and nil for any argument)
      helper.raises("bad argument #1 to 'members' (string expected, got nil)", ps.members, ps, nil)
      helper.raises("bad argument #1 to 'topic_stats' (string expected, got table)", ps.topic_stats, ps, {})
      for _, bad in ipairs {
        { { queue = "big" }, "bad option 'queue' (positive integer expected, got string)" },
        { { queue = 0 }, "bad option 'queue' (positive integer expected, got 0)" },
        { { queue = 1.5 }, "bad option 'queue' (positive integer expected, got 1.5)" },
        { { unsubscribe_delay = "x" }, "bad option 'unsubscribe_delay' (non-negative number expected, got string)" },
        { { timeout = -1 }, "bad option 'timeout' (positive number expected, got -1)" },
        { { history_ttl = "1" }, "bad option 'history_ttl' (non-negative number expected, got string)" },
        { { kind = "utf8" }, "bad option 'kind' (\"text\" or \"binary\" expected, got string)" },
        { { on_event = true }, "bad option 'on_event' (function expected, got boolean)" },
        { { node = 1 }, "bad option 'node' (string expected, got number)" },
        { { prefix = false }, "bad option 'prefix' (string expected, got boolean)" },
        { { redis = 6379 }, "bad option 'redis' (URL or table expected, got number)" },
        { { redis = "http://127.0.0.1:6379" },
          "bad option 'redis' (invalid Redis URL (redis://, rediss:// or unix:// expected): http://127.0.0.1:6379)" },
        { { redis = { url = 5 } }, "bad option 'redis' (its url: string expected, got number)" },
        { { redis = { url = "redis://127.0.0.1/?db=x" } },
          "bad option 'redis' (invalid database in Redis URL: redis://127.0.0.1/?db=x)" },
        -- (regression: these were taken, and every publish failed, or the subscriber retried
        -- its connect forever, "down", with the option's error)
        { { history = -1 }, "bad option 'history' (positive integer expected, got -1)" },
        { { history = 1.5 }, "bad option 'history' (positive integer expected, got 1.5)" },
        { { redis = "redis://127.0.0.1:1", connect_timeout = "x" },
          "bad option 'connect_timeout' (number expected, got string)" },
        { { redis = { url = "redis://127.0.0.1:1", max_bulk = 0 } },
          "bad option 'max_bulk' (positive integer expected, got 0)" },
        -- (redis.subscriber's own checks, the same for configure)
        { { redis = "redis://127.0.0.1:1", backoff_max = 0 },
          "bad option 'backoff_max' (positive number expected, got 0)" },
        { { redis = "redis://127.0.0.1:1", probe_timeout = "soon" },
          "bad option 'probe_timeout' (positive number expected, got string)" },
        { { redis = { url = "redis://127.0.0.1:1", db = -1 } },
          "bad option 'db' (non-negative integer expected, got -1)" },
      } do
        bad[1].bus = false
        helper.raises(bad[2], pubsub.new, bad[1])
        -- (regression: configure took them; pubsub.default() raised in every handler instead)
        helper.raises(bad[2], pubsub.configure, bad[1])
      end
      -- (seconds, as every timeout: numbers or numeric strings)
      pubsub.configure { redis = "redis://127.0.0.1:1", probe_timeout = "2", backoff_max = "0.5" }
      pubsub.configure {}
      ps:close()
    end)
  end)
end)

-- Regression: bus.join had no way to remove a listener and ps:close did not leave the bus, so
-- a closed pubsub kept delivering the other workers' messages to its handlers, and every
-- pubsub.new() left a listener (and its instance) behind for the life of the worker.
describe("moonwire.pubsub on the workers bus", function()
  local bus = require "moonwire.pubsub.bus"

  -- A frame as the hub relays it from another worker's publish.
  local function frame(topic, seq, data)
    return string.pack(">s4", string.pack(">s2s4", topic, "other " .. seq .. " 0 -\n" .. data))
  end

  -- Runs fn(accept) with this process playing a worker: bus.path names a listener that plays
  -- the hub, accept() -> the hub's end of the worker's bus connection; cleans up whatever
  -- happens.
  local function as_worker(fn)
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -m 700 " .. dir))
    local l = assert(mw.unix.listen(dir .. "/bus.sock"))
    bus.path = dir .. "/bus.sock"
    local hub
    local ok, err = pcall(fn, function()
      hub = assert(l:accept())
      return hub
    end)
    bus.path = nil
    if hub then hub:close() end
    l:close()
    os.remove(dir .. "/bus.sock")
    os.remove(dir)
    assert(ok, err)
  end

  it("a closed pubsub leaves the bus: it delivers nothing more and can be collected", function()
    run(function()
      as_worker(function(accept)
        local closed, open = pubsub.new(), pubsub.new()
        assert.is_true(closed._bus)
        local hub = accept()
        local got_closed, got_open = {}, {}
        closed:subscribe("t", function(d) got_closed[#got_closed + 1] = d end)
        open:subscribe("t", function(d) got_open[#got_open + 1] = d end)
        assert(hub:write(frame("t", 1, "one")))
        wait_for(function() return #got_closed == 1 and #got_open == 1 end, 3, "the first frame")
        closed:close()
        assert.has_error(function() closed:subscribe("t", function() end) end, "pubsub: subscribe after close")
        assert(hub:write(frame("t", 2, "two")))
        -- frames are read in order: once the open instance has the third, the closed one had
        -- its chance at the second and the third
        assert(hub:write(frame("t", 3, "three")))
        wait_for(function() return #got_open == 3 end, 3, "the later frames")
        mw.sleep(0.05)        -- (its handler task, had it been fed)
        assert.same({ "one" }, got_closed)
        assert.equal(1, closed.stats.delivered)
        -- nothing but this test holds the closed instance now
        local weak = setmetatable({ closed }, { __mode = "v" })
        closed, got_closed = nil, nil
        for _ = 1, 3 do collectgarbage("collect") end
        assert.is_nil(weak[1], "the closed pubsub is still referenced (its bus listener)")
        open:close()
      end)
    end)
  end)

  -- a listener's error ended the bus's reading task: every later frame was lost, to every
  -- listener of the process, silently
  it("a listener that raises does not stop the others' frames", function()
    run(function()
      as_worker(function(accept)
        local got = {}
        local leave1 = assert(bus.join(function() error("listener bug") end))
        local _ <close> = setmetatable({}, { __close = leave1 })
        local leave2 = assert(bus.join(function(body) got[#got + 1] = body end))
        local _2 <close> = setmetatable({}, { __close = leave2 })
        assert(accept():write(string.pack(">s4", "one"), string.pack(">s4", "two")))
        wait_for(function() return #got == 2 end, 3, "both frames")
        assert.same({ "one", "two" }, got)
      end)
    end)
  end)
end)

describe("moonwire.pubsub over Redis", function()
  it("a publish reaches every node once, in each publisher's order; a node's own once", function()
    run(function()
      local a, b, c = node(), node(), node()
      wait_for(function() return a.state == "up" and b.state == "up" and c.state == "up" end)
      local got = { a = {}, b = {}, c = {} }
      for name, ps in pairs { a = a, b = b, c = c } do
        ps:subscribe("room", function(data) table.insert(got[name], data) end)
      end
      mw.sleep(0.05)  -- the SUBSCRIBEs are sent; Redis has them before the publishes below
      local N = 300
      local pa = mw.spawn(function() for i = 1, N do assert(a:publish("room", "a" .. i)) end end)
      local pb = mw.spawn(function() for i = 1, N do assert(b:publish("room", "b" .. i)) end end)
      pa:join() pb:join()
      wait_for(function() return #got.a == 2 * N and #got.b == 2 * N and #got.c == 2 * N end, 5, "deliveries")
      mw.sleep(0.1)
      for name, list in pairs(got) do
        assert.equal(2 * N, #list, name)
        local next_a, next_b = 1, 1
        for _, m in ipairs(list) do
          local who, i = m:match("^(%a)(%d+)$")
          i = tonumber(i)
          if who == "a" then assert.equal(next_a, i) next_a = i + 1
          else assert.equal(next_b, i) next_b = i + 1 end
        end
      end
      a:close() b:close() c:close()
    end)
  end)

  it("10,000 topics with join/leave churn: one Redis subscription per topic, gone after the delay", function()
    run(function()
      local a, b = node(), node()
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local N = 10000
      local got, handles = 0, {}
      local function fn() got = got + 1 end
      for i = 1, N do handles[i] = b:subscribe("t" .. i, fn) end
      local r = admin()
      wait_for(function() return r:pubsub("NUMSUB", "mw:t1")[2] == 1 and r:pubsub("NUMSUB", "mw:t" .. N)[2] == 1 end)
      -- churn: leave and join every topic 5 times; nothing reaches Redis (the delay hides it)
      local before = r:info("stats"):match("total_commands_processed:(%d+)")
      for _ = 1, 5 do
        for i = 1, N do handles[i]:close() end
        for i = 1, N do handles[i] = b:subscribe("t" .. i, fn) end
      end
      mw.sleep(0.5)
      local after = r:info("stats"):match("total_commands_processed:(%d+)")
      assert.is_true(tonumber(after) - tonumber(before) < 50, "churn reached Redis")
      for i = 1, N do mw.spawn(function() a:publish("t" .. i, "x") end) end
      wait_for(function() return got == N end, 10, "10,000 deliveries")
      -- everyone leaves: unsubscribed after the delay, in batches
      for i = 1, N do handles[i]:close() end
      wait_for(function() return r:pubsub("NUMSUB", "mw:t1")[2] == 0 and r:pubsub("NUMSUB", "mw:t" .. N)[2] == 0 end)
      assert.is_nil(next(b._topics))
      r:close() a:close() b:close()
    end, 30)
  end)
end)

describe("moonwire.pubsub when Redis fails", function()
  it("a publish whose connect raised (here: from a nested coroutine) does not leave it connecting for good", function()
    run(function()
      local ps = node { timeout = 0.5 }
      wait_for(function() return ps.state == "up" end)
      local ok, err = pcall(coroutine.wrap(function() return ps:publish("t", "x") end))
      assert.is_false(ok)
      assert.matches("nested coroutine", err)
      assert(ps:publish("t", "from the task"))       -- (was: "Redis unavailable", for good)
      ps:close()
    end)
  end)

  it("killed mid-stream: publish says so, local delivery goes on; restarted: resubscribed within " ..
     "the backoff bound, history recovered without a gap", function()
    run(function()
      local a, b = node { history = 1000 }, node { history = 1000, backoff_min = 0.3 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local ga, gb = {}, {}
      a:subscribe("h", function(d) ga[#ga + 1] = d end)
      b:subscribe("h", function(d) gb[#gb + 1] = d end)
      mw.sleep(0.05)
      for i = 1, 10 do assert(a:publish("h", tostring(i))) end
      wait_for(function() return #gb == 10 end)
      -- b misses 11..20: its subscription is cut (as a failover would) and it waits its backoff
      -- (0.3 s at least) before reconnecting; meanwhile a publishes, Redis saves and dies
      local r = admin()
      assert.equal(1, r:client("KILL", "ID", b:subscriber()._conn:client("ID")))
      for i = 11, 20 do assert(a:publish("h", tostring(i))) end
      assert.equal("OK", r:save())       -- what the restarted Redis will load
      r:close()
      srv.kill()
      wait_for(function() return a.state == "down" end, 3, "a down")
      local ok, err = a:publish("h", "21")
      assert.is_nil(ok)
      assert.is_string(err)
      assert.equal(21, #ga)             -- delivered locally all the same
      assert.equal("21", ga[21])
      assert.equal(10, #gb)
      srv.restart()
      local t0 = mw.now()
      wait_for(up(a), 3, "a up again")
      wait_for(up(b), 3, "b up again")
      -- the bound: backoff_max (0.5 s) + one connect attempt that may catch the server starting
      -- (connect_timeout: probe_timeout + 1 s)
      local took = mw.now() - t0
      assert.is_true(took < 0.5 + 1.3 + 0.5, ("resubscribed after %.2f s, over the backoff bound"):format(took))
      wait_for(function() return #gb == 20 end, 3, "b recovered 11..20")
      for i = 1, 20 do assert.equal(tostring(i), gb[i]) end
      assert.equal(1, count_events(b, "recovered"))
      assert.equal(0, count_events(b, "lost"))
      a:close() b:close()
    end, 20)
  end)

  it("restarted empty: the epoch change is reported, never a silent gap", function()
    run(function()
      local a, b = node { history = 100 }, node { history = 100 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local gb = {}
      b:subscribe("e", function(d) gb[#gb + 1] = d end)
      mw.sleep(0.05)
      for i = 1, 5 do assert(a:publish("e", tostring(i))) end
      wait_for(function() return #gb == 5 end)
      local r = admin() r:flushall() r:save() r:close()   -- the restarted server starts empty
      srv.restart()
      wait_for(function() return count_events(b, "lost") == 1 end, 3, "lost reported")
      local lost
      for _, e in ipairs(b.events) do if e[1] == "lost" then lost = e end end
      assert.equal("e", lost[2])
      assert.equal("epoch", lost[3].reason)
      -- and the topic goes on from the new stream
      wait_for(up(a), 3)
      assert(a:publish("e", "after"))
      wait_for(function() return gb[#gb] == "after" end, 3)
      a:close() b:close()
    end, 20)
  end)

  -- Cuts ps's subscription (as a failover would); ps waits its backoff before reconnecting.
  local function cut(ps)
    local r = admin()
    assert.equal(1, r:client("KILL", "ID", ps:subscriber()._conn:client("ID")))
    r:close()
    wait_for(function() return ps.state == "down" end, 3, "the cut to be seen")
  end

  -- Waits until Redis has `n` subscribers on the topic's channel.
  local function subscribed(topic, n)
    local r = admin()
    wait_for(function() return r:pubsub("NUMSUB", "mw:" .. topic)[2] == n end, 3, "the subscriptions")
    r:close()
  end

  -- Regression (review): a lost subscription (here CLIENT KILL of a's subscriber, as CLIENT
  -- KILL TYPE pubsub does) closed the publishing connection too: publishes Redis had already
  -- taken returned nil, "closed" (20 of 20 were in fact delivered), and an application that
  -- published again sent duplicates. The publishing connection's fate is its own I/O's now.
  -- (CLIENT PAUSE WRITE holds the publishes in Redis: they are in flight when the cut is seen.)
  it("a subscriber cut while publishes are in flight: they succeed (nil would mean not sent)", function()
    run(function()
      local a, b = node { probe_interval = 5 }, node { probe_interval = 5 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local gb = {}
      b:subscribe("inflight", function(d) gb[#gb + 1] = d end)
      subscribed("inflight", 1)
      assert(a:publish("inflight", "0"))         -- (a's publishing connection is made)
      wait_for(function() return #gb == 1 end, 3, "the first")
      local r = admin()
      assert.equal("OK", r:client("PAUSE", 5000, "WRITE"))
      local N = 20
      local tasks = {}
      for i = 1, N do tasks[i] = mw.spawn(function() return table.pack(a:publish("inflight", tostring(i))) end) end
      wait_for(function() return a._pub and a._pub:pending() == N end, 3, "the publishes in flight")
      assert.equal(1, r:client("KILL", "ID", a:subscriber()._conn:client("ID")))
      wait_for(function() return count_events(a, "down") >= 1 end, 3, "a's subscriber down")
      assert.equal("OK", r:client("UNPAUSE"))
      for i = 1, N do
        local _, res = tasks[i]:join(5)
        assert.same({ true, n = 1 }, res)
      end
      wait_for(function() return #gb == N + 1 end, 3, "b to get every message")
      assert.equal(0, a.stats.publish_errors)
      r:close() a:close() b:close()
    end)
  end)

  -- A publish whose reply did not come within `timeout` may have been published: it says so
  -- (code "unknown"); it returned "timeout" under the promise that nil means "not sent". The
  -- connection that timed out is retired: the next publish goes on a fresh one.
  it("a publish unanswered within its timeout: nil, 'outcome unknown', 'unknown'; the next on a new connection",
  function()
    run(function()
      local a, b = node { timeout = 0.2, probe_interval = 5 }, node { probe_interval = 5 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local gb = {}
      b:subscribe("slow", function(d) gb[#gb + 1] = d end)
      subscribed("slow", 1)
      assert(a:publish("slow", "0"))
      wait_for(function() return #gb == 1 end, 3, "the first")
      local first = a._pub
      local r = admin()
      assert.equal("OK", r:client("PAUSE", 5000, "WRITE"))
      local ok, err, code = a:publish("slow", "1")
      assert.equal("OK", r:client("UNPAUSE"))
      assert.is_nil(ok)
      assert.equal("unknown", code)
      assert.matches("^outcome unknown", err)
      assert.is_true(a:publish("slow", "2"))
      assert.are_not.equal(first, a._pub)
      assert.is_false(first:alive())        -- (retired: Redis drops what it had not run yet)
      wait_for(function() return gb[#gb] == "2" end, 3, "the next")
      r:close() a:close() b:close()
    end)
  end)

  -- Regression (review): a history topic whose stream went back (Redis restarted from an
  -- older snapshot) kept its offset: the new messages, numbered again from the snapshot's
  -- offset, were dropped as duplicates, silently, until the offsets passed the old one (and
  -- those published while it was cut off were skipped by its recovery). The recovery at the
  -- reconnect sees the stream's top below its offset, or another message at it: "lost"
  -- (rollback), then what this process never had. b reconnects 1 s after the restart: what
  -- a publishes meanwhile (2 messages: the top stays below b's offset 6; 4: it passes it)
  -- is only in the stream.
  for _, case in ipairs { { 2, "below" }, { 4, "past" } } do
    local n, where = case[1], case[2]
    it(("a history topic whose Redis restarted from an older snapshot (the new top %s the offset): " ..
        "lost (rollback), then every new message"):format(where), function()
      run(function()
        local a, b = node { history = 100 }, node { history = 100, backoff_min = 1, backoff_max = 1 }
        wait_for(function() return a.state == "up" and b.state == "up" end)
        local gb = {}
        local topic = "snap" .. n
        b:subscribe(topic, function(d) gb[#gb + 1] = d end)
        subscribed(topic, 1)
        for i = 1, 3 do assert(a:publish(topic, "old" .. i)) end
        local r = admin()
        assert.equal("OK", r:save())          -- the snapshot: offset 3
        r:close()
        for i = 4, 6 do assert(a:publish(topic, "old" .. i)) end
        wait_for(function() return #gb == 6 end, 3, "the first 6")
        srv.restart()
        wait_for(up(a), 3, "a up again")
        for i = 1, n do assert(a:publish(topic, "new" .. i)) end     -- offsets 4..
        assert.equal("down", b.state)         -- (they are only in the stream)
        wait_for(up(b), 3, "b up again")
        assert(a:publish(topic, "live"))
        wait_for(function() return #gb == 7 + n end, 5, "the new messages")
        local want = { "old1", "old2", "old3", "old4", "old5", "old6" }
        for i = 1, n do want[#want + 1] = "new" .. i end
        want[#want + 1] = "live"
        assert.same(want, gb)
        assert.equal(1, count_events(b, "lost"))
        for _, e in ipairs(b.events) do
          if e[1] == "lost" then assert.equal("rollback", e[3].reason) end
        end
        a:close() b:close()
      end, 20)
    end)
  end

  -- The same rollback seen live (the keys put back while the subscription stays up): the first
  -- message at or below the offset that this process never had shows it.
  it("a history topic whose stream went back while subscribed: lost (rollback), then the new messages", function()
    run(function()
      local a, b = node { history = 100 }, node { history = 100 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local gb = {}
      b:subscribe("back", function(d) gb[#gb + 1] = d end)
      subscribed("back", 1)
      for i = 1, 5 do assert(a:publish("back", "old" .. i)) end
      wait_for(function() return #gb == 5 end, 3, "the first 5")
      local r = admin()         -- what restoring the keys from an older snapshot does: offset 2
      local keep = r:xrange("mw:{back}:stream", "-", "0-2")
      assert.equal(1, r:del("mw:{back}:stream"))
      for _, e in ipairs(keep) do assert(r:xadd("mw:{back}:stream", e[1], e[2][1], e[2][2])) end
      assert(r:hset("mw:{back}:meta", "o", 2))
      r:close()
      for i = 1, 4 do assert(a:publish("back", "new" .. i)) end   -- offsets 3..6
      wait_for(function() return #gb == 9 end, 5, "the new messages")
      assert.same({ "old1", "old2", "old3", "old4", "old5", "new1", "new2", "new3", "new4" }, gb)
      assert.equal(1, count_events(b, "lost"))
      for _, e in ipairs(b.events) do
        if e[1] == "lost" then assert.equal("rollback", e[3].reason) end
      end
      a:close() b:close()
    end)
  end)

  -- Regression: recovery ran on "up" only for a topic with an offset, and a topic got its
  -- offset from its first message: what was published while a node that had not had a
  -- message yet was cut off was lost, silently. A history topic now reads its stream's place
  -- before it subscribes, and recovers from there.
  -- Regression (found by review): a live message held while a recovery read the stream, and
  -- trimmed from it before the read (a small history, a busy topic), from a publisher this
  -- process had nothing later of, was taken for a rollback when replayed after the read;
  -- held again for the next recovery, which could never see it: "lost (rollback)" and a
  -- stream read, over and over, the topic never out of recovery.
  it("closed while its publishing connection was being made: that connection is closed too", function()
    run(function()
      local r = admin()
      local _r <close> = helper.closer(r)
      local function clients() return select(2, r:client("LIST"):gsub("\n", "")) end
      local base = clients()
      local ps = node()
      -- its connect takes 0.3 s (a slow network)
      ps._redis = setmetatable({ connect = function(...)
        mw.sleep(0.3)
        return redis.connect(...)
      end }, { __index = redis })
      local t = mw.spawn(function() return ps:publish("x", "m") end)
      mw.sleep(0.1)
      ps:close()
      local _, ok, err, code = t:join()
      assert.is_nil(ok)
      assert.equal("closed", code, err)
      wait_for(function() return clients() <= base end, 2, "its connection closed")
    end)
  end)

  it("a held live message trimmed before the recovery read is no rollback", function()
    run(function()
      local a = node { history = 1 }
      local p, q = node { history = 1 }, node { history = 1 }
      wait_for(function() return a.state == "up" and p.state == "up" and q.state == "up" end)
      local got = {}
      a:subscribe("tr", function(d) got[#got + 1] = d end)
      local r = admin()
      local _r <close> = helper.closer(r)
      wait_for(function() return r:pubsub("NUMSUB", "mw:tr")[2] == 1 end)
      assert(q:publish("tr", "q1"))
      assert(p:publish("tr", "p1"))
      wait_for(function() return #got == 2 end)
      -- a's reads of the stream go out 0.5 s late (a slow link): its recovery's read too
      local real = assert(a:_conn())
      a._pub = setmetatable({ pipeline = function(_, fn) mw.sleep(0.5) return real:pipeline(fn) end }, {
        __index = function(_, k)
          local v = real[k]
          if type(v) == "function" then return function(_, ...) return v(real, ...) end end
          return v
        end })
      -- a's subscription is cut: once back it recovers (the slow read); meanwhile q publishes
      -- once and p 300 times, the stream (history 1: ~100 kept) trims q2, held live by a
      assert.equal(1, r:client("KILL", "ID", a:subscriber()._conn:client("ID")))
      wait_for(function() return a.state == "down" end, 5, "down")
      wait_for(up(a), 5, "up")
      wait_for(function() return a._topics.tr.recovering end, 5, "recovering")
      assert(q:publish("tr", "q2"))
      for i = 2, 301 do assert(p:publish("tr", "p" .. i)) end
      a._pub = real
      wait_for(function() return got[#got] == "p301" and not a._topics.tr.recovering end, 10, "p301")
      for _, e in ipairs(a.events) do
        assert.is_false(e[1] == "lost" and e[3].reason == "rollback", "a rollback reported")
      end
      a:close(); p:close(); q:close()
    end, 30)
  end)

  it("a history topic cut off before its first message recovers what was published meanwhile", function()
    run(function()
      -- (a reconnects 1 to 2 s after the cut: its backoff)
      local a, b = node { history = 100, backoff_min = 2, backoff_max = 2 }, node { history = 100 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local ga = {}
      a:subscribe("first", function(d) ga[#ga + 1] = d end)
      subscribed("first", 1)
      cut(a)
      for i = 1, 3 do assert(b:publish("first", "during" .. i)) end
      assert.equal("down", a.state)       -- they were published while a was cut off
      wait_for(function() return #ga == 3 end, 5, "a to recover the 3 messages")
      assert.same({ "during1", "during2", "during3" }, ga)
      assert.equal(1, count_events(a, "recovered"))
      assert.equal(0, count_events(a, "lost"))
      a:close() b:close()
    end)
  end)

  -- A recovery read its whole backlog in one XRANGE under `timeout`: one longer than that failed
  -- every time, was retried for good, and the topic's live messages piled up undelivered. It
  -- reads a page (1,000 entries) at a time now, each under `timeout`.
  it("a history topic recovers a backlog larger than one read can take in its timeout", function()
    run(function()
      local N = 60000
      -- (b's reads are small: the default timeout; a's, 0.1 s: what the whole backlog's read
      -- takes more than, and a page's far less)
      local a, b = node { history = 100000, timeout = 0.1, backoff_min = 1, backoff_max = 1 },
        node { history = 100000 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local got = 0
      a:subscribe("backlog", function() got = got + 1 end)
      subscribed("backlog", 1)
      assert(b:publish("backlog", "first"))
      wait_for(function() return got == 1 end, 3, "the first")
      cut(a)
      -- published while a is cut off, in the publish script's format, by the server itself
      local r = admin()
      local epoch = r:hget("mw:{backlog}:meta", "e")
      r:eval([[
        for i = 1, tonumber(ARGV[1]) do
          local off = redis.call('HINCRBY', KEYS[1], 'o', 1)
          redis.call('XADD', KEYS[2], '0-' .. off, 'e', 'x ' .. i .. ' ' .. off .. ' ' .. ARGV[2] .. '\nm')
        end]], 2, "mw:{backlog}:meta", "mw:{backlog}:stream", N, epoch)
      r:close()
      for i = 1, 3 do assert(b:publish("backlog", "live" .. i)) end
      wait_for(function() return got == N + 4 end, 20, "the backlog and the live messages")
      assert.equal(0, count_events(a, "lost"))
      a:close() b:close()
    end, 30)
  end)

  -- A history topic's place is read before it subscribes: a message published between that
  -- read and the subscription taking effect is only in the stream. The subscription's
  -- confirmation (on_subscribed) reads it; a quiet topic missed it until its next message.
  it("a history topic gets what was published between reading its place and its subscription", function()
    run(function()
      local a, b = node { history = 100 }, node { history = 100 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local sub = a:subscriber()
      local real = sub.subscribe
      sub.subscribe = function(self, ...)     -- a message while a's SUBSCRIBE is on its way
        assert(b:publish("between", "x"))
        return real(self, ...)
      end
      local ga = {}
      a:subscribe("between", function(d) ga[#ga + 1] = d end)
      wait_for(function() return #ga == 1 end, 3, "the message published in between")
      assert.same({ "x" }, ga)
      assert.equal(0, count_events(a, "lost"))
      a:close() b:close()
    end)
  end)

  -- Regression: after the stream started again (Redis restarted empty, the keys expired), the
  -- recovery read the new stream after the old offset, then reported the epoch change: the new
  -- stream's first entries were skipped, silently.
  it("a history topic whose stream started again while cut off: lost (epoch), then the new stream from its start",
  function()
    run(function()
      local a, b = node { history = 100, backoff_min = 2, backoff_max = 2 }, node { history = 100 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local ga = {}
      a:subscribe("again", function(d) ga[#ga + 1] = d end)
      subscribed("again", 1)
      for i = 1, 5 do assert(b:publish("again", "old" .. i)) end
      wait_for(function() return #ga == 5 end, 3, "the first 5")
      cut(a)
      local r = admin()     -- what a restart without the data does to the topic
      assert.equal(2, r:del("mw:{again}:meta", "mw:{again}:stream"))
      r:close()
      for i = 1, 8 do assert(b:publish("again", "new" .. i)) end
      assert.equal("down", a.state)
      wait_for(function() return #ga == 13 end, 5, "a to recover the new stream")
      assert.same({ "old1", "old2", "old3", "old4", "old5", "new1", "new2", "new3", "new4", "new5", "new6",
        "new7", "new8" }, ga)
      assert.equal(1, count_events(a, "lost"))
      for _, e in ipairs(a.events) do
        if e[1] == "lost" then assert.equal("epoch", e[3].reason) end
      end
      a:close() b:close()
    end)
  end)

  -- Regression: a recovery whose read failed (no connection, a timeout) gave up and threw away
  -- the live messages it held back; on a quiet topic they, and the missed ones, stayed
  -- undelivered with no event. It is now tried again (backoff) until it succeeds.
  it("a history recovery whose read fails is tried again, and keeps the live messages it held", function()
    run(function()
      local a, b = node { history = 100, backoff_min = 1, backoff_max = 1 }, node { history = 100 }
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local ga = {}
      a:subscribe("retry", function(d) ga[#ga + 1] = d end)
      subscribed("retry", 1)
      assert(b:publish("retry", "1"))
      wait_for(function() return #ga == 1 end, 3, "the first")
      -- the recovery's first read fails once a live message is held back
      local gate, failed = mw.channel(), 0
      a._conn = function()
        gate:recv(5)
        failed = failed + 1
        a._conn = nil          -- (the class's again)
        return nil, "injected failure", "unavailable"
      end
      cut(a)
      for i = 2, 3 do assert(b:publish("retry", tostring(i))) end
      assert.equal("down", a.state)
      wait_for(up(a), 5, "a up again")
      local seen = a:subscriber().stats.messages
      assert(b:publish("retry", "4"))        -- live, held back by the recovery
      wait_for(function() return a:subscriber().stats.messages > seen end, 3, "the live message")
      gate:close()
      wait_for(function() return #ga == 4 end, 5, "the recovery, tried again")
      assert.equal(1, failed)
      assert.same({ "1", "2", "3", "4" }, ga)
      assert.equal(0, count_events(a, "lost"))
      a:close() b:close()
    end)
  end)

  it("SIGSTOP for a while, then SIGCONT: the probe notices and the subscriber comes back", function()
    run(function()
      local a = node()
      wait_for(up(a), 3)
      local got = {}
      a:subscribe("s", function(d) got[#got + 1] = d end)
      local b = node()
      wait_for(up(b), 3)
      os.execute("kill -STOP " .. srv.pid)
      wait_for(function() return a.state == "down" end, 3, "the probe to notice")
      assert.is_true(a:subscriber().stats.probe_failures >= 1)
      os.execute("kill -CONT " .. srv.pid)
      wait_for(up(a), 3, "up after SIGCONT")
      wait_for(up(b), 3)
      assert(b:publish("s", "hello"))
      wait_for(function() return got[1] == "hello" end, 3)
      a:close() b:close()
    end, 20)
  end)

  it("CLIENT KILL TYPE pubsub: reconnected and resubscribed, reported down then up", function()
    run(function()
      local a, b = node(), node()
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local got = {}
      a:subscribe("k", function(d) got[#got + 1] = d end)
      mw.sleep(0.05)
      local r = admin()
      assert.is_true(r:client("KILL", "TYPE", "pubsub") >= 2)
      wait_for(function() return count_events(a, "down") >= 1 end, 3)
      wait_for(up(a), 3)
      wait_for(up(b), 3)
      assert.equal(1, a:subscriber().stats.reconnects)
      assert(b:publish("k", "after kill"))
      wait_for(function() return got[1] == "after kill" end, 3)
      r:close() a:close() b:close()
    end, 20)
  end)

  it("a subscriber cut at its output-buffer limit reconnects and counts what it lost", function()
    run(function()
      local r = admin()
      assert.equal("OK", r:config("SET", "client-output-buffer-limit", "pubsub 256kb 128kb 1"))
      local a, b = node(), node()
      wait_for(function() return a.state == "up" and b.state == "up" end)
      local got = 0
      local release = mw.channel(1)
      b:subscribe("flood", function() got = got + 1 end)
      -- b's Redis reader stops at the flood's first message until the whole flood was
      -- published: its socket's receive buffer cannot grow then (loopback autotunes it up to
      -- tcp_rmem's max, 32 MB here, for a reader that keeps up, and the flood would fit), so
      -- Redis's output buffer for b passes the limit, however slow the publishing. (A handler
      -- that blocks would not do: it runs in the topic's task, and the reader goes on, the
      -- topic's full queue dropping.) The reader calls _incoming inline.
      local incoming, seen = b._incoming, 0
      b._incoming = function(self, topic, env)
        if topic == "flood" then
          seen = seen + 1
          if seen == 2 then release:recv(15) end
        end
        return incoming(self, topic, env)
      end
      mw.sleep(0.05)
      -- a gap is seen against the last sequence number b has from a on the topic: b hears from
      -- a once before the flood (else, cut before its first flood message, b could not tell the
      -- flood from what a published before b subscribed)
      assert(a:publish("flood", "first"))
      wait_for(function() return got == 1 end, 3, "the first message")
      local big = ("x"):rep(16 * 1024)
      local N = 400     -- 6.4 MB in one write: more than the subscriber's socket and 256 kB
      local tasks = {}
      for i = 1, N do tasks[i] = mw.spawn(function() return a:publish("flood", big) end) end
      for i = 1, N do assert(tasks[i]:join()) end
      release:close()
      wait_for(function() return b:subscriber().stats.reconnects >= 1 end, 5, "the cut subscriber to reconnect")
      wait_for(up(b), 3)
      assert(a:publish("flood", "last"))
      local ok = pcall(wait_for, function() return got + b.stats.lost == N + 2 end, 5)
      assert(ok, ("every message delivered or counted: %d + %d ~= %d (reconnects %d)"):format(got, b.stats.lost, N + 2,
        b:subscriber().stats.reconnects))
      assert.is_true(b.stats.lost > 0)
      assert.is_true(count_events(b, "drop") >= 1)
      assert.equal("OK", r:config("SET", "client-output-buffer-limit", "pubsub 32mb 8mb 60"))
      r:close() a:close() b:close()
    end, 20)
  end)
end)

-- Regression (found by bench/fanout): a server whose WebSockets joined a topic did not exit on
-- SIGTERM: the default pubsub instance's Redis subscriber kept mw.run going after the server
-- closed. http.serve (and each worker) now close that instance after their server.
describe("moonwire.pubsub and the server's shutdown", function()
  it("http.serve returns on SIGTERM after a WebSocket joined a topic over Redis", function()
    local out, how, code = helper.subprocess(([[
local mw = require "moonwire"
local http = require "moonwire.http"
local core = require "moonwire.core"
require("moonwire.pubsub").configure { redis = %q }
http.serve {
  host = "127.0.0.1", port = 0,
  handler = function(req)
    local ws = assert(req:websocket())
    assert(ws:join("room"))
    for _ in ws:messages() do end
  end,
  on_listen = function(srv)
    mw.spawn(function()
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%%d/"):format(srv.port)))
      mw.sleep(0.3)            -- joined, the subscriber is up
      core.kill(core.getpid(), "SIGTERM")
      ws:receive(5)            -- the server closes it (1001)
    end)
  end,
}
print("serve returned")
]]):format(srv.url), 10)
    assert.equal("exit", how, out)
    assert.equal(0, code, out)
    assert.matches("serve returned", out, 1, true)
  end)
end)
