-- moonwire.redis against a real redis-server (spec/redis_server.lua starts one per file, on
-- a free port and a Unix socket in a temp dir, and a TLS one with the test CA; stopped in
-- teardown): URLs, Unix sockets, AUTH with an ACL user, SELECT, HELLO 3 and RESP3 values,
-- error replies and nulls, pipelines (10,000 commands), 100 tasks sharing one connection,
-- transactions, scripts (NOSCRIPT), pools (reuse, waiting), TLS, timeouts, refused
-- connections, a server killed mid-call, RESP3 pushes (client tracking) and a peer that
-- breaks the protocol.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local redis = require "moonwire.redis"
local server = require "spec.redis_server"

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"

local srv, certs
setup(function()
  certs = os.tmpname()
  os.remove(certs)
  local p = io.popen(SPEC_DIR .. "/fixtures/make-certs " .. certs .. " 2>&1")
  local log = p:read("a")
  assert(p:close(), "make-certs failed: " .. log)
  srv = server.start { tls = certs }
end)

teardown(function()
  if srv then srv.stop() end
  if certs then os.execute("rm -rf '" .. certs .. "'") end
end)

local function connect(opts)
  return assert(redis.connect(srv.url, opts))
end

describe("moonwire.redis", function()
  it("connects by URL and runs commands as methods; nil replies are redis.null", function()
    run(function()
      local r <close> = connect()
      assert.equal("OK", r:set("greeting", "hello"))
      assert.equal("hello", r:get("greeting"))
      assert.equal(redis.null, r:get("no-such-key"))
      assert.equal(1, r:del("greeting"))
      assert.equal(5, r:incrby("counter:a", 5))
      assert.equal("OK", r:call("SET", "k2", 42))
      assert.equal("42", r:call("get", "k2"))
      assert.same({ "42", redis.null }, r:mget("k2", "nope"))
      assert.equal("PONG", r:ping())
    end)
  end)

  it("returns nil, message, 'redis' for an error reply, and the connection goes on", function()
    run(function()
      local r <close> = connect()
      r:set("str", "x")
      local v, err, code = r:lpush("str", "y")
      assert.is_nil(v)
      assert.matches("^WRONGTYPE", err)
      assert.equal("redis", code)
      v, err, code = r:call("NO-SUCH-COMMAND")
      assert.is_nil(v)
      assert.matches("^ERR unknown command", err)
      assert.equal("redis", code)
      assert.equal("x", r:get("str"))
    end)
  end)

  it("raises naming the argument for tables and nil, before anything is sent", function()
    run(function()
      local r <close> = connect()
      helper.raises("bad argument #2 to 'set' (string or number expected, got table)", r.set, r, "k", {})
      helper.raises("bad argument #2 to 'set' (string or number expected, got nil)", r.set, r, "k", nil)
      helper.raises("bad argument #1 to 'get'", function() r:pipeline(function(p) p:get({}) end) end)
      assert.equal("PONG", r:ping())
    end)
  end)

  it("selects the database of the URL path", function()
    run(function()
      local r2 <close> = assert(redis.connect(srv.url .. "/2"))
      r2:set("where", "db2")
      local r0 <close> = connect()
      assert.equal(redis.null, r0:get("where"))
      r0:select(2)
      assert.equal("db2", r0:get("where"))
    end)
  end)

  it("connects over a Unix socket (unix:// URL and { path = })", function()
    run(function()
      local a <close> = assert(redis.connect("unix://" .. srv.path .. "?db=3"))
      a:set("u", "unix")
      local b <close> = assert(redis.connect { path = srv.path, db = 3 })
      assert.equal("unix", b:get("u"))
    end)
  end)

  it("authenticates an ACL user (AUTH user pass, and HELLO 3 AUTH); a wrong password fails", function()
    run(function()
      local admin <close> = connect()
      assert.equal("OK", admin:acl("SETUSER", "alice", "on", ">s3cret", "~*", "+@all"))
      local port = srv.port
      local a <close> = assert(redis.connect(("redis://alice:s3cret@127.0.0.1:%d"):format(port)))
      assert.equal("alice", a:acl("WHOAMI"))
      local a3 <close> = assert(redis.connect { port = port, user = "alice", password = "s3cret", resp = 3 })
      assert.equal("alice", a3:acl("WHOAMI"))
      local v, err, code = redis.connect(("redis://alice:wrong@127.0.0.1:%d"):format(port))
      assert.is_nil(v)
      assert.matches("WRONGPASS", err)
      assert.equal("redis", code)
    end)
  end)

  it("speaks RESP3 after HELLO 3: maps, sets, doubles, booleans, big numbers, verbatim, nulls", function()
    run(function()
      local r <close> = connect { resp = 3 }
      assert.equal(3, r.hello.proto)
      assert.equal("redis", r.hello.server)
      r:hset("h3", "a", "1", "b", "2")
      assert.same({ a = "1", b = "2" }, r:hgetall("h3"))
      r:sadd("s3", "x")
      assert.same({ "x" }, r:smembers("s3"))
      assert.equal(3.141, r:debug("PROTOCOL", "double"))
      assert.equal(true, r:debug("PROTOCOL", "true"))
      assert.equal(false, r:debug("PROTOCOL", "false"))
      assert.equal(redis.null, r:debug("PROTOCOL", "null"))
      assert.equal("1234567999999999999999999999999999999", r:debug("PROTOCOL", "bignum"))
      assert.equal("This is a verbatim\nstring", r:debug("PROTOCOL", "verbatim"))
      assert.equal("Some real reply following the attribute", r:debug("PROTOCOL", "attrib"))
      assert.same({ [0] = false, [1] = true, [2] = false }, r:debug("PROTOCOL", "map"))
      assert.same({ 0, 1, 2 }, r:debug("PROTOCOL", "set"))
      assert.equal(2.5, r:zincrby("z3", 2.5, "m"))
    end)
  end)

  it("pipelines 10,000 commands in one batch and returns every reply in order", function()
    run(function()
      local r <close> = connect()
      r:del("pcount")
      local res = assert(r:pipeline(function(p)
        for _ = 1, 10000 do p:incr("pcount") end
        p:get("no-such")
        p:lpush("pcount", "x")
      end))
      assert.equal(10002, #res)
      for i = 1, 10000 do assert.equal(i, res[i]) end
      assert.equal(redis.null, res[10001])
      assert.is_true(redis.is_error(res[10002]))
      assert.matches("^WRONGTYPE", res[10002].message)
    end)
  end)

  it("shares one connection between 100 tasks, each getting its own replies", function()
    run(function()
      local r <close> = connect()
      local tasks = {}
      for i = 1, 100 do
        tasks[i] = mw.spawn(function()
          local key = "task:" .. i
          r:del(key)
          for j = 1, 100 do
            assert.equal(j, r:incr(key))
            assert.equal(tostring(j), r:get(key))
          end
          return true
        end)
      end
      for i = 1, 100 do assert.is_true(select(2, tasks[i]:join())) end
      assert.equal(0, (r:pending()))
    end, 30)
  end)

  it("runs a transaction: MULTI/EXEC results, EXECABORT, and a WATCH abort", function()
    run(function()
      local r <close> = connect()
      local res = assert(r:transaction(function(t)
        t:set("tx", 1)
        t:incr("tx")
        t:get("tx")
      end))
      assert.same({ "OK", 2, "2" }, res)
      local v, err, code = r:transaction(function(t) t:set("tx", 1) t:call("NO-SUCH") end)
      assert.is_nil(v)
      assert.matches("^EXECABORT", err)
      assert.equal("redis", code)
      -- WATCH needs the connection to itself: take one from a pool
      local pool = redis.pool { url = srv.url, size = 1 }
      local c = assert(pool:acquire())
      c:watch("tx")
      local other <close> = connect()
      other:set("tx", "changed")
      v, err, code = c:transaction(function(t) t:set("tx", "mine") end)
      assert.is_nil(v)
      assert.equal("aborted", code)
      assert.equal("transaction aborted", err)
      assert.equal("changed", other:get("tx"))
      pool:release(c)
      pool:close()
    end)
  end)

  it("runs scripts by EVALSHA, loading them on NOSCRIPT", function()
    run(function()
      local r <close> = connect()
      local s = redis.script("return { KEYS[1], ARGV[1], redis.call('INCR', KEYS[1]) }")
      r:script("FLUSH")
      r:del("sk")
      assert.same({ "sk", "a", 1 }, s:run(r, { "sk" }, { "a" }))   -- NOSCRIPT, then EVAL
      assert.equal(1, r:script("EXISTS", s.sha)[1])
      assert.same({ "sk", "b", 2 }, s:run(r, { "sk" }, { "b" }))   -- EVALSHA
      local bad = redis.script("return redis.call('NO-SUCH')")
      local v, err, code = bad:run(r)
      assert.is_nil(v)
      assert.equal("redis", code)
      assert.matches("Unknown Redis command", err)
    end)
  end)

  it("pools connections: reuse, at most `size`, waiting for a release, acquire timeout", function()
    run(function()
      local pool = redis.pool { url = srv.url, size = 2 }
      local a = assert(pool:acquire())
      local id = a:client("ID")
      pool:release(a)
      local b = assert(pool:acquire())
      assert.equal(id, b:client("ID"))             -- the same connection again
      local c = assert(pool:acquire())
      assert.are_not.equal(id, c:client("ID"))
      helper.fails("timeout", pool:acquire(0.05))  -- both lent out
      local got
      local waiter = mw.spawn(function() got = assert(pool:acquire(5)) end)
      mw.sleep(0.01)
      assert.is_nil(got)
      pool:release(b)
      waiter:join()
      assert.equal(b, got)
      -- many tasks through pool:call, never more than 2 connections
      local ts = {}
      pool:release(c)
      pool:release(got)
      for i = 1, 20 do ts[i] = mw.spawn(function() return pool:call("INCR", "pooled") end) end
      for i = 1, 20 do assert.is_true((ts[i]:join())) end
      assert.equal(2, pool._n)
      pool:close()
    end)
  end)

  -- Regressions (found by review): a pool took back a connection still owing a reply (a
  -- BLPOP that timed out): the next user waited behind it, and the BLPOP, still waiting on
  -- the server, took the next job pushed and it was lost. And redis.connect(tbl, opts)
  -- ignored opts; redis.subscriber{ host, port } (no url) never connected.
  it("a pool drops a connection owing a reply; connect(tbl, opts) takes both; subscriber{ host, port }", function()
    run(function()
      local pool = redis.pool { url = srv.url, size = 1, timeout = 0.2 }
      local v, _, code = pool:call("BLPOP", "jobs:pool", 0)
      assert.is_nil(v)
      assert.equal("timeout", code)
      local r <close> = connect()
      assert.equal(1, r:rpush("jobs:pool", "job1"))
      assert.equal("PONG", pool:call("PING"))         -- a fresh connection, not the blocked one
      assert.equal(1, r:llen("jobs:pool"))            -- the job is still there
      pool:close()
      local u = assert(require("moonwire.url").parse(srv.url))
      local c <close> = assert(redis.connect({ host = u.host, port = u.port }, { db = 3 }))
      assert.equal("OK", c:set("where", "db3"))
      assert.equal(redis.null, r:get("where"))        -- r is on db 0
      local got = mw.channel(1)
      local sub = redis.subscriber { host = u.host, port = u.port, on_message = function(_, data) got:send(data) end }
      sub:subscribe("news:tbl")
      local deadline = mw.now() + 5
      while r:publish("news:tbl", "hi") == 0 and mw.now() < deadline do mw.sleep(0.02) end
      assert.equal("hi", got:recv(5))
      sub:close()
    end, 20)
  end)

  it("connects with TLS (rediss://, verified against cafile) and refuses an unknown CA", function()
    run(function()
      local url = ("rediss://localhost:%d"):format(srv.tls_port)
      local r <close> = assert(redis.connect(url, { cafile = certs .. "/ca.pem" }))
      assert.equal("OK", r:set("tls", "yes"))
      assert.equal("yes", r:get("tls"))
      helper.fails("tls", redis.connect(url, { connect_timeout = 5 }))
    end)
  end)

  it("times out a call (per connection and per call) and keeps the connection usable", function()
    run(function()
      local r <close> = connect { timeout = 0.1 }
      r:del("emptylist")
      helper.fails("timeout", r:blpop("emptylist", 0.5))
      -- the BLPOP reply (null, in 0.5 s) is read and dropped; the next call gets its own
      r:settimeout(5)
      assert.equal("PONG", r:ping())
      r:settimeout(nil)
      helper.fails("timeout", mw.timeout(0.05, r.blpop, r, "emptylist", 0.2))
      assert.equal("OK", r:set("after", "timeout"))
      assert.equal("timeout", r:get("after"))
    end)
  end)

  it("reports a refused connection", function()
    run(function()
      helper.fails("ECONNREFUSED", redis.connect(("redis://127.0.0.1:%d"):format(helper.free_port())))
    end)
  end)

  it("fails every in-flight call when the server dies; none hangs; later calls fail at once", function()
    local victim = server.start()
    local ok, err = pcall(run, function()
      local r = assert(redis.connect(victim.url))
      local ts = {}
      for i = 1, 20 do
        ts[i] = mw.spawn(function() return r:blpop("never" .. i, 0) end)
      end
      mw.sleep(0.05)
      assert.equal(20, (r:pending()))
      victim.kill()
      for i = 1, 20 do
        local _, v, msg, code = ts[i]:join()
        assert.is_nil(v)
        assert.is_string(msg)
        assert.is_string(code)
      end
      assert.is_false(r:alive())
      local v, msg = r:get("x")
      assert.is_nil(v)
      assert.is_string(msg)
      r:close()
    end, 10)
    victim.stop()
    assert(ok, err)
  end)

  it("keeps RESP3 pushes (client tracking) apart from replies, and queues them with `pushes`", function()
    run(function()
      local r <close> = connect { resp = 3, pushes = true }
      local w <close> = connect()
      assert.equal("OK", r:client("TRACKING", "on"))
      w:set("tracked", "1")
      assert.equal("1", r:get("tracked"))
      w:set("tracked", "2")                      -- an invalidation push goes to r
      for i = 1, 50 do assert.equal("PONG", r:ping(), "reply " .. i) end
      assert.equal("2", r:get("tracked"))
      local push = assert(r:push_recv(2))
      assert.same({ "invalidate", { "tracked" } }, push)
      -- without `pushes`, they are dropped (counted), replies still match
      local q <close> = connect { resp = 3 }
      q:client("TRACKING", "on")
      q:get("tracked")
      w:set("tracked", "3")
      for _ = 1, 10 do assert.equal("PONG", q:ping()) end
      assert.equal("3", q:get("tracked"))
      local _, _, dropped = q:pending()
      assert.equal(1, dropped)
    end)
  end)

  it("sends SUBSCRIBE without a reply slot (r:send) and delivers messages as pushes", function()
    run(function()
      local sub <close> = connect { resp = 3, pushes = true }
      local pub <close> = connect()
      assert.is_true(sub:send("SUBSCRIBE", "news"))
      assert.same({ "subscribe", "news", 1 }, sub:push_recv(2))
      assert.equal(1, pub:publish("news", "hello"))
      assert.same({ "message", "news", "hello" }, sub:push_recv(2))
      assert.equal("PONG", sub:ping())           -- RESP3: commands go on while subscribed
      helper.fails("timeout", sub:push_recv(0.05))
    end)
  end)

  -- r, made in an earlier run, answers a call in a run of its own
  local function answers_in_a_new_run(r)
    run(function()
      r:settimeout(3)
      assert.equal("PONG", r:ping())
      r:close()
    end)
  end

  -- A run that ends (mw.stop) while a call is in flight kills the connection's reader task
  -- without letting it clear its mark; the next run's calls must start a new reader
  -- instead of waiting forever.
  it("keeps working in a later run after a run ended with a call in flight", function()
    local r
    run(function()
      r = connect()
      mw.spawn(function() r:blpop("never-filled", 0.2) end)
      mw.sleep(0.02)
    end)
    answers_in_a_new_run(r)
  end)

  -- The same when the run ends after a call dispatched the reader but before the reader
  -- first ran: its "being started" mark belongs to that run only.
  it("keeps working in a later run after a run ended before its reader started", function()
    local r, started
    mw.run(function()                       -- not helper.run: mw.stop ends this body early
      r = connect()
      mw.spawn(function()
        started = true
        r:blpop("never-filled", 0.2)       -- dispatches the reader, which is queued behind main
      end)
      mw.yield()                            -- the call above runs, then main is back first
      assert.is_true(started)
      mw.stop()
    end)
    answers_in_a_new_run(r)
  end)

  it("fails with 'protocol' on a peer that does not speak RESP, and closes", function()
    run(function()
      local l, port = helper.listen()
      mw.spawn(function()
        local s = l:accept()
        s:read("l")
        s:write("HTTP/1.1 400 Bad Request\r\n\r\n")
        s:read("a")
        s:close()
      end)
      local r = assert(redis.connect({ port = port }))
      local v, err, code = r:ping()
      assert.is_nil(v)
      assert.matches("protocol error", err)
      assert.equal("protocol", code)
      assert.is_false(r:alive())
      l:close()
    end)
  end)
end)

describe("redis clients when something raises or lags", function()
  it("a pool whose connect raises (a bad option) gives its slot back: the next acquire raises too, at once", function()
    run(function()
      local pool = redis.pool{ url = srv.url, size = 1, acquire_timeout = 5,
        tls = { cafile = "/nonexistent/ca.pem" } }
      for _ = 1, 2 do
        local ok, err = pcall(pool.acquire, pool)
        assert.is_false(ok)
        assert.matches("CA file", err)
      end
    end)
  end)

  it("an error reply to a command sent with send (SUBSCRIBE) goes to push_recv, not to the next call", function()
    -- (it went to the next call: its GET returned the NOPERM error, and the GET's own reply,
    -- taken for a reply nobody asked for, failed the connection)
    run(function()
      local admin <close> = connect()
      assert(admin:call("ACL", "SETUSER", "mw_nochan", "on", ">pw", "~*", "+@all", "resetchannels"))
      assert(admin:set("k", "value-of-k"))
      local r <close> = connect{ resp = 3, pushes = true, user = "mw_nochan", password = "pw" }
      assert.is_true(r:send("SUBSCRIBE", "news"))
      assert.equal("value-of-k", r:get("k"))
      local v = assert(r:push_recv(2))
      assert.is_true(redis.is_error(v))
      assert.matches("NOPERM", v.message)
      assert.equal("PONG", r:ping())
      -- and a SUBSCRIBE that works: its confirmation is a push, the next call gets its reply
      local ok <close> = connect{ resp = 3, pushes = true }
      assert.is_true(ok:send("SUBSCRIBE", "a", "b"))
      assert.equal("value-of-k", ok:get("k"))
      assert.same({ "subscribe", "a", 1 }, assert(ok:push_recv(2)))
      assert.same({ "subscribe", "b", 2 }, assert(ok:push_recv(2)))
      assert.is_true(ok:send("UNSUBSCRIBE"))
      assert.equal("PONG", ok:ping())
      assert(admin:call("ACL", "DELUSER", "mw_nochan"))
    end)
  end)

  -- Regression: an UNSUBSCRIBE (or PUNSUBSCRIBE) without arguments waited for a confirmation
  -- whose count was 0, but Redis counts channels and patterns together: subscribed to a
  -- channel and a pattern, UNSUBSCRIBE's last count is 1, its slot never ended and every
  -- later call got the reply of the call before it.
  -- Now a PING follows it and the PING's reply ends it, under RESP2 and RESP3. And
  -- r:call("PUNSUBSCRIBE", p) under RESP3 (answered by a push) waited forever while the next
  -- call's reply went to it: it returns true once confirmed.
  it("an UNSUBSCRIBE of everything with patterns left ends; later calls get their own replies", function()
    run(function()
      for _, resp in ipairs { 3, 2 } do
        local r <close> = connect { resp = resp, pushes = true, timeout = 2 }
        assert.is_true(r:send("SUBSCRIBE", "uc1"))
        assert.is_true(r:send("PSUBSCRIBE", "up*"))
        assert.is_true(r:send("UNSUBSCRIBE"))         -- the pattern remains: its count is 1
        local pong = r:ping()
        if resp == 2 then assert.same({ "pong", "" }, pong) else assert.equal("PONG", pong) end
        assert.is_true(r:call("PUNSUBSCRIBE", "up*"))
        assert.equal("x", r:echo("x"))
        assert.is_true(r:send("UNSUBSCRIBE"))         -- subscribed to nothing: one answer, count 0
        assert.is_true(r:unsubscribe())
        assert.equal("y", r:echo("y"))
        assert.equal(0, (r:pending()))
        local kinds = {}
        for i = 1, 6 do
          local v = assert(r:push_recv(1))
          kinds[i] = v[1] .. " " .. tostring(v[2]) .. " " .. v[3]
        end
        assert.same({ "subscribe uc1 1", "psubscribe up* 2", "unsubscribe uc1 1", "punsubscribe up* 0",
          "unsubscribe " .. tostring(redis.null) .. " 0", "unsubscribe " .. tostring(redis.null) .. " 0" }, kinds)
        helper.fails("timeout", r:push_recv(0.05))
      end
    end)
  end)

  -- Regression: r:send of a command other than the SUBSCRIBE family took no reply slot: its
  -- reply went to the next call (a GET returned "OK"), and the GET's own reply, nobody's,
  -- failed the connection. Its reply is now read and dropped.
  it("r:send of an ordinary command: its reply is dropped, not given to the next call", function()
    run(function()
      local r <close> = connect { timeout = 2 }
      assert.is_true(r:send("SET", "sent:k", "v"))
      assert.is_true(r:send("NO-SUCH-COMMAND"))
      assert.equal("v", r:get("sent:k"))
      assert.equal("PONG", r:ping())
      assert.is_true(r:alive())
      assert.equal(0, (r:pending()))
    end)
  end)

  -- Regression: a SUBSCRIBE-family command in r:pipeline or r:transaction took one plain
  -- reply of the batch. Under RESP3 its confirmations are pushes the batch never counted: the
  -- batch timed out waiting and every later call got the reply of the one before it. Under
  -- RESP2 each confirmation took the next command's place ({ "PING", "SUBSCRIBE a b", "PING" }
  -- returned the second confirmation for the last PING), and an UNSUBSCRIBE of everything got
  -- no PING to tell where its confirmations end. Inside MULTI/EXEC Redis counts one element of
  -- EXEC's array per command but sends one per name (redis/redis#12207): the GET after a
  -- SUBSCRIBE a b leaked out of EXEC's reply. They are refused now, before anything is sent.
  it("refuses the SUBSCRIBE family in pipelines and transactions; later calls stay in step", function()
    run(function()
      for _, resp in ipairs { 3, 2 } do
        local pong = resp == 2 and { "pong", "" } or "PONG"     -- RESP2 while subscribed
        local r <close> = connect { resp = resp, pushes = true, timeout = 2 }
        assert.is_true(r:call("SUBSCRIBE", "bc1"))
        assert.is_true(r:call("PSUBSCRIBE", "bp*"))
        for _, cmd in ipairs { { "UNSUBSCRIBE" }, { "SUBSCRIBE", "ba", "bb" }, { "psubscribe", "bq*" },
                               { "PUNSUBSCRIBE", "bp*" }, { "SSUBSCRIBE", "bs" }, { "sunsubscribe" } } do
          local msg = "bad argument #1 to 'pipeline' (" .. cmd[1]:upper() .. " cannot be pipelined: use r:call)"
          local function batch(p) p:ping(); p:call(table.unpack(cmd)); p:ping() end
          local err = helper.raises(msg, function() r:pipeline(batch) end)
          assert.matches("redis_spec%.lua:%d+: bad argument", err)    -- the p:call line
        end
        helper.raises("bad argument #1 to 'pipeline' (UNSUBSCRIBE cannot be pipelined: use r:call)",
          function() r:pipeline(function(p) p:unsubscribe() end) end)
        helper.raises("bad argument #1 to 'transaction' (SUBSCRIBE cannot be in a transaction: use r:call)",
          function() r:transaction(function(t) t:subscribe("ba", "bb"); t:get("k") end) end)
        assert.same({ pong, pong }, r:pipeline(function(p) p:ping(); p:ping() end))
        assert.is_true(r:call("UNSUBSCRIBE"))
        assert.is_true(r:call("PUNSUBSCRIBE"))
        assert.same({ "OK", "1" }, r:transaction(function(t) t:set("bk", 1); t:get("bk") end))
        assert.equal("y", r:echo("y"))
        assert.equal(0, (r:pending()))
        local kinds = {}
        for i = 1, 4 do kinds[i] = assert(r:push_recv(1))[1] end
        assert.same({ "subscribe", "psubscribe", "unsubscribe", "punsubscribe" }, kinds)
        helper.fails("timeout", r:push_recv(0.05))
      end
    end)
  end)

  -- Regression: after a server restart a pool handed out its idle connections, dead (their
  -- alive() flag changed only when a reader saw the end, and an idle connection has none):
  -- the first call after the restart failed with "closed". An idle connection is now probed
  -- (a non-blocking peek, as pg's pool does), over TCP and TLS.
  it("a pool does not hand out an idle connection the server closed (restart)", function()
    local victim = server.start { tls = certs }
    local ok, err = pcall(run, function()
      local plain = redis.pool { url = victim.url, size = 2 }
      local tls = redis.pool { url = ("rediss://localhost:%d"):format(victim.tls_port), cafile = certs .. "/ca.pem" }
      for _, pool in ipairs { plain, tls } do assert.equal("PONG", pool:call("PING")) end
      local idle = plain._idle[1]
      victim.restart()
      for _, pool in ipairs { plain, tls } do
        assert.equal("PONG", pool:call("PING"))
        assert.equal(1, pool._n)
        pool:close()
      end
      assert.is_false(idle:alive())
    end, 15)
    victim.stop()
    assert(ok, err)
  end)

  -- Regression: r:settimeout on a pooled connection stayed after its release: the next
  -- borrower's calls timed out after the previous borrower's timeout.
  it("a pooled connection's settimeout does not carry over to the next borrower", function()
    run(function()
      local pool = redis.pool { url = srv.url, size = 1 }
      local a = assert(pool:acquire())
      a:settimeout(0.05)
      pool:release(a)
      local b = assert(pool:acquire())
      assert.equal(a, b)
      assert.equal(redis.null, b:blpop("never:pooled", 0.3))   -- not "timeout" after 0.05 s
      b:settimeout(0.05)
      pool:release(b)
      local tpool = redis.pool { url = srv.url, size = 1, timeout = 0.05 }
      local v, _, code = tpool:call("BLPOP", "never:pooled", 0.3)
      assert.is_nil(v)
      assert.equal("timeout", code)                         -- the pool's own timeout stays
      pool:close()
      tpool:close()
    end)
  end)

  -- Regression: under RESP2 r.hello was nil, so the lookup fell through to the command
  -- methods and r.hello was the HELLO command's function (truthy; r.hello.proto raised).
  it("r.hello is the HELLO 3 map under RESP3 and false under RESP2", function()
    run(function()
      local r2 <close> = connect()
      assert.is_false(r2.hello)
      local r3 <close> = connect { resp = 3 }
      assert.equal(3, r3.hello.proto)
      assert.equal("server", r2:call("HELLO")[1])    -- HELLO itself: through r:call (RESP2: a flat array)
    end)
  end)

  it("a subscription made while the subscriber connects (before it is up) is sent once it is", function()
    run(function()
      local got = {}
      local sub <close> = redis.subscriber(srv.url, { on_message = function(ch, data) got[ch] = data end })
      sub:subscribe("early")
      while not sub._conn do mw.yield() end      -- connected; its PING not answered yet
      sub:subscribe("late")
      while sub.state ~= "up" do mw.sleep(0.005) end
      local r <close> = connect()
      local channels = {}
      for _, ch in ipairs(r:pubsub("CHANNELS", "*")) do channels[ch] = true end
      assert.is_true(channels.early and channels.late)
      r:publish("early", "1")
      r:publish("late", "2")
      local deadline = mw.now() + 5
      while got.late == nil and mw.now() < deadline do mw.sleep(0.01) end
      assert.same({ early = "1", late = "2" }, got)
    end)
  end)

  -- Regression (found while fixing the next one): the subscriber's undo methods were
  -- sub:unpsubscribe and sub:unssubscribe (the docs say punsubscribe, sunsubscribe) and sent
  -- UNPSUBSCRIBE and UNSSUBSCRIBE, which Redis does not know: patterns and shard channels
  -- stayed subscribed on the server.
  it("a subscriber's punsubscribe and sunsubscribe leave the pattern and the shard channel", function()
    run(function()
      local up, confirmed = mw.channel(1), mw.channel(1)
      local sub <close> = redis.subscriber(srv.url, {
        on_state = function(state) if state == "up" then up:send(true) end end,
        on_subscribed = function(ch) if ch == "undo:after" then confirmed:send(true) end end })
      sub:psubscribe("undo:p*")
      sub:ssubscribe("undo:s")
      assert.is_true(up:recv(5))
      local r <close> = connect()
      assert.equal(1, r:publish("undo:p1", "x"))   -- (receivers: the pattern's, only)
      assert.same({ "undo:s", 1 }, r:pubsub("SHARDNUMSUB", "undo:s"))
      sub:punsubscribe("undo:p*")
      sub:sunsubscribe("undo:s")
      sub:subscribe("undo:after")   -- confirmed after Redis ran the two before it
      assert.is_true(confirmed:recv(5))
      assert.equal(0, r:publish("undo:p1", "x"))
      assert.same({ "undo:s", 0 }, r:pubsub("SHARDNUMSUB", "undo:s"))
      assert.is_nil(next(sub:channels("psubscribe")))
      assert.is_nil(next(sub:channels("ssubscribe")))
    end)
  end)

  -- Regression (found by review): the subscriber handed on_message everything Redis sent
  -- before its UNSUBSCRIBE took effect: an app that unsubscribed at message 10 of a burst
  -- got thousands more while sub:channels() was already empty. dispatch now drops a message
  -- whose channel (or, for a pmessage, pattern) is no longer in the wanted set.
  it("a subscriber delivers nothing for a channel, pattern or shard channel once unsubscribed", function()
    run(function()
      local counts, done, up = { message = 0, pmessage = 0, smessage = 0 }, mw.channel(1), mw.channel(1)
      local sub
      local undo = { message = "unsubscribe", pmessage = "punsubscribe", smessage = "sunsubscribe" }
      local names = { message = "unsub:a", pmessage = "unsub:p*", smessage = "unsub:s" }
      sub = redis.subscriber(srv.url, {
        on_state = function(state) if state == "up" then up:send(true) end end,
        on_message = function(ch, _, _, kind)
          if ch == "unsub:end" then return done:send(true) end
          counts[kind] = counts[kind] + 1
          if counts[kind] == 10 then sub[undo[kind]](sub, names[kind]) end
        end })
      sub:subscribe("unsub:a", "unsub:end")
      sub:psubscribe("unsub:p*")
      sub:ssubscribe("unsub:s")
      assert.is_true(up:recv(5))
      local r <close> = connect()
      assert(r:pipeline(function(p)
        for i = 1, 2000 do
          p:publish("unsub:a", i)
          p:publish("unsub:p1", i)
          p:spublish("unsub:s", i)
        end
      end))
      r:publish("unsub:end", "x")   -- after every message of the burst on the subscriber's connection
      assert.is_true(done:recv(5))
      assert.same({ message = 10, pmessage = 10, smessage = 10 }, counts)
      assert.is_nil(next(sub:channels("psubscribe")))
      sub:close()
    end)
  end)

  -- Regression (found by review): script:run's misuse raised errors naming something else:
  -- keys as a string gave "bad argument #3 to 'EVALSHA'", args as a number "attempt to get
  -- length of a number value". Its connection, keys and args are checked first.
  it("script:run raises naming its argument: the connection, keys and args", function()
    run(function()
      local r <close> = connect()
      local s = redis.script("return #KEYS + #ARGV")
      helper.raises("bad argument #1 to 'run' (moonwire.Redis expected, got string)", s.run, s, "r")
      helper.raises("bad argument #2 to 'run' (table of keys expected, got string)", s.run, s, r, "counter")
      helper.raises("bad argument #3 to 'run' (table of args expected, got number)", s.run, s, r, { "k" }, 5)
      helper.raises("bad argument #2 to 'run' (keys[2]: string or number expected, got table)",
        s.run, s, r, { "k", {} })
      helper.raises("bad argument #3 to 'run' (args[1]: string or number expected, got boolean)",
        s.run, s, r, nil, { true })
      assert.equal(3, s:run(r, { "k" }, { 1, "x" }))
      assert.equal(0, s:run(r))
    end)
  end)

  -- Regression (found by review): a db or resp in a URL's query that is not a number
  -- (?db=abc, ?db=1x, ?resp=three) was dropped: writes went to db 0, or over RESP2. And
  -- connect{ db = "x" } connected, to db 0 (handshake() SELECTs only a db ~= 0).
  it("refuses a db or resp that is not one: in a URL's query (as in its path) and as an option", function()
    for _, u in ipairs { "redis://127.0.0.1/abc", "unix:///tmp/r.sock?db=abc", "redis://127.0.0.1?db=1x",
      "redis://127.0.0.1:6379/2?db=-1", "redis://127.0.0.1?db=99999999999999999999",
      "redis://127.0.0.1/99999999999999999999" } do
      local o, err = redis.parse_url(u)
      assert.is_nil(o)
      assert.equal("invalid database in Redis URL: " .. u, err)
    end
    for _, u in ipairs { "redis://127.0.0.1?resp=three", "rediss://h?protocol=4", "unix:///tmp/r.sock?resp=" } do
      local o, err = redis.parse_url(u)
      assert.is_nil(o)
      assert.equal("invalid protocol (2 or 3) in Redis URL: " .. u, err)
    end
    local o = assert(redis.parse_url("unix:///tmp/r.sock?db=7&resp=3"))
    assert.equal(7, o.db)
    assert.equal(3, o.resp)
    run(function()
      helper.raises("bad argument #1 to 'connect' (invalid database in Redis URL: " .. srv.url .. "?db=x)",
        redis.connect, srv.url .. "?db=x")
      helper.raises("bad argument #1 to 'pool' (invalid protocol (2 or 3) in Redis URL", redis.pool,
        { url = srv.url .. "?resp=three" })
      for _, db in ipairs { "x", "-1", -1, 1.5 } do
        helper.raises("bad option 'db' (non-negative integer expected, got " .. tostring(db) .. ")",
          redis.connect, srv.url, { db = db })
      end
      local r <close> = connect { db = 0 }
      assert.equal("PONG", r:ping())
      -- digits in a string (an environment variable's) are the number
      local r1 <close> = connect { db = "1" }
      assert(r1:set("mw:db-string", "one"))
      assert.equal(redis.null, r:get("mw:db-string"))
      assert.equal("one", r1:get("mw:db-string"))
      r1:del("mw:db-string")
    end)
  end)

  -- Regression (found by review): pool:release took the same connection twice: it was idle
  -- twice, two acquires handed it to two borrowers (one's UNWATCH dropped the other's WATCH,
  -- whose transaction then committed), and a broken one released twice gave its slot back
  -- twice (the pool grew past `size`). release now refuses a connection it has not lent out.
  it("a pool refuses to take back a connection it did not lend, or one released already", function()
    run(function()
      local pool = redis.pool { url = srv.url, size = 2 }
      local other = redis.pool { url = srv.url, size = 1 }
      local msg = "bad argument #1 to 'release' (connection not lent out by this pool"
      local c = assert(pool:acquire())
      pool:release(c)
      helper.raises(msg, pool.release, pool, c)
      local a, b = assert(pool:acquire()), assert(pool:acquire())
      assert.are_not.equal(a, b)
      local stranger = assert(other:acquire())
      helper.raises(msg, pool.release, pool, stranger)
      local r <close> = connect()
      helper.raises(msg, pool.release, pool, r)
      -- a broken one gives its slot back once
      a:close()
      pool:release(a)
      helper.raises(msg, pool.release, pool, a)
      assert.equal(1, pool._n)
      -- one handed from a release to a waiting acquire is the waiter's to release
      local got
      local waiter = mw.spawn(function()
        got = assert(pool:acquire(5))
        pool:release(got)
      end)
      local c2 = assert(pool:acquire())
      while pool._waiters.last < pool._waiters.first do mw.yield() end   -- the waiter is queued
      pool:release(b)
      waiter:join()
      assert.equal(b, got)
      helper.raises(msg, pool.release, pool, b)
      pool:release(c2)
      assert.equal(2, pool._n)
      assert.equal("PONG", pool:call("PING"))
      other:release(stranger)
      pool:close()
      other:close()
    end)
  end)

  -- Regression: redis.subscriber meant to raise for a bad URL but called parse_url, which
  -- returns nil, err: its task retried the URL forever, and on_state never said so (the
  -- state starts "down").
  it("redis.subscriber raises for a malformed URL, as connect does", function()
    run(function()
      helper.raises("bad argument #1 to 'subscriber' (invalid Redis URL", redis.subscriber, "http://127.0.0.1")
      helper.raises("bad argument #1 to 'subscriber' (invalid database in Redis URL", redis.subscriber,
        { url = srv.url .. "?db=x" })
      -- and for a bad option in the table form (it was retried in the task, unseen)
      helper.raises("bad option 'db' (non-negative integer expected, got -1)", redis.subscriber, srv.url,
        { db = -1 })
      helper.raises("bad option 'resp' (2 or 3 expected, got 7)", redis.connect, { url = srv.url, resp = 7 })
      helper.raises("bad argument #1 to 'subscriber' (URL or table expected, got number)", redis.subscriber, 5)
      -- (regression: callbacks that are not functions were taken; each call wrote an error)
      helper.raises("bad option 'on_message' (function expected, got string)", redis.subscriber, srv.url,
        { on_message = "print" })
      helper.raises("bad option 'on_state' (function expected, got number)", redis.subscriber,
        { url = srv.url, on_state = 1 })
      helper.raises("bad option 'on_subscribed' (function expected, got boolean)", redis.subscriber, srv.url,
        { on_subscribed = true })
      -- (regression: a misspelt kind answered nil)
      local sub = redis.subscriber(srv.url)
      sub:psubscribe("p:*")
      assert.same({ ["p:*"] = true }, sub:channels("psubscribe"))
      assert.same({}, sub:channels())
      helper.raises([[bad argument #1 to 'channels' ("subscribe", "psubscribe" or "ssubscribe" expected, ]]
        .. [[got "pattern")]], sub.channels, sub, "pattern")
      sub:close()
    end)
  end)

  -- Regression (found by review): only db and resp were checked up front. A bad user,
  -- password or name raised from the handshake naming 'AUTH' or 'CLIENT' (its socket left
  -- open), max_bulk/max_depth/max_pushes were checked once connected (max_pushes = "x" or 0
  -- taken as 1), and redis.subscriber (so pubsub) retried a bad one forever in its task.
  it("every connect option is checked before connecting, naming the option", function()
    run(function()
      local cases = {
        { { user = {}, password = "pw" }, "bad option 'user' (string expected, got table)" },
        { { password = {} }, "bad option 'password' (string expected, got table)" },
        { { name = true }, "bad option 'name' (string expected, got boolean)" },
        { { timeout = "x" }, "bad option 'timeout' (number expected, got string)" },
        { { connect_timeout = "x" }, "bad option 'connect_timeout' (number expected, got string)" },
        -- (regression: NaN was taken here, then raised by the connect as "bad option 'timeout'")
        { { connect_timeout = 0 / 0 }, "bad option 'connect_timeout' (number expected, got " },
        { { max_bulk = 0 }, "bad option 'max_bulk' (positive integer expected, got 0)" },
        { { max_depth = 129 }, "bad option 'max_depth' (integer 1..128 expected, got 129)" },
        { { max_pushes = "x" }, "bad option 'max_pushes' (positive integer expected, got string)" },
        { { max_pushes = 0 }, "bad option 'max_pushes' (positive integer expected, got 0)" },
        { { host = 1 }, "bad option 'host' (string expected, got number)" },
        { { port = "x" }, "bad option 'port' (port number expected, got string)" },
        { { port = 70000 }, "bad option 'port' (port number expected, got 70000)" },
      }
      for _, c in ipairs(cases) do
        -- (on a port nothing listens on: raised before connecting, not ECONNREFUSED)
        local o = { host = "127.0.0.1", port = 1 }
        for k, v in pairs(c[1]) do o[k] = v end
        helper.raises(c[2], redis.connect, o)
        helper.raises(c[2], redis.pool, o)
        helper.raises(c[2], redis.subscriber, o)
      end
      -- (timeouts may be numeric strings, as everywhere: docs/api.md)
      local r <close> = connect { max_bulk = 1024, max_depth = 128, max_pushes = 5, port = tostring(srv.port),
        timeout = "5", connect_timeout = "5" }
      assert.equal("PONG", r:ping())
    end)
  end)

  -- Regression (found by review): a bad acquire_timeout, or a bad timeout to acquire, was
  -- taken, and raised "bad argument #1 to 'park'" only once a task had to wait.
  it("a pool's acquire_timeout and acquire's timeout are checked, naming them", function()
    run(function()
      helper.raises("bad option 'acquire_timeout' (number expected, got string)", redis.pool,
        { url = srv.url, acquire_timeout = "x" })
      -- (a numeric string is a timeout, as everywhere: docs/api.md)
      local pool = redis.pool { url = srv.url, size = 1, acquire_timeout = "5" }
      helper.raises("bad argument #1 to 'acquire' (number expected, got string)", pool.acquire, pool, "x")
      local c = assert(pool:acquire())
      helper.raises("bad argument #1 to 'acquire' (number expected, got table)", pool.acquire, pool, {})
      assert.same({ nil, "timeout", "timeout" }, { pool:acquire(0.05) })
      assert.same({ nil, "timeout", "timeout" }, { pool:acquire("0.05") })
      pool:release(c)
      pool:close()
    end)
  end)

  -- Regression (found by review): the state starts "down", so a Redis unreachable from the
  -- start was never reported (docs/pubsub.md: "down" when the connection is lost or cannot
  -- be made, once per outage), and neither was pubsub's on_event("down").
  it("a subscriber whose first connect fails says \"down\" once", function()
    run(function()
      local states = {}
      local sub = redis.subscriber("redis://127.0.0.1:1", { backoff_min = 0.02, backoff_max = 0.05,
        on_state = function(state, info) states[#states + 1] = state .. " " .. tostring(info.error) end })
      mw.sleep(0.4)
      sub:close()
      assert.same({ "down Connection refused" }, states)
      local events = {}
      local ps = require("moonwire.pubsub").new { redis = "redis://127.0.0.1:1", backoff_min = 0.02,
        backoff_max = 0.05,
        on_event = function(event, _, info) events[#events + 1] = event .. " " .. tostring(info.error) end }
      mw.sleep(0.4)
      ps:close()
      assert.same({ "down Connection refused" }, events)
    end)
  end)

  -- A URL in an error message shows no password (errors end up in logs).
  it("URL errors hide the password", function()
    local _, err = redis.parse_url("redis://u:s3cret@127.0.0.1/x")
    assert.equal("invalid database in Redis URL: redis://u:***@127.0.0.1/x", err)
    _, err = redis.parse_url("unix:///tmp/r.sock?password=s3cret&db=x")
    assert.equal("invalid database in Redis URL: unix:///tmp/r.sock?password=***&db=x", err)
    _, err = redis.parse_url("redis://u:s3cret@127.0.0.1:99999/")
    assert.is_nil(err:find("s3cret", 1, true))
    assert.matches("redis://u:***@127.0.0.1:99999/", err, 1, true)
    -- redis://secret@host: a userinfo without ":" is the password
    _, err = redis.parse_url("redis://s3cret@127.0.0.1/x")
    assert.equal("invalid database in Redis URL: redis://***@127.0.0.1/x", err)
    _, err = redis.parse_url("redis://s3cret@127.0.0.1:99999/")
    assert.is_nil(err:find("s3cret", 1, true))
  end)
end)
