-- TCP sockets (docs/api.md "Sockets"): listen/connect, IPv4 and IPv6 loopback, read formats
-- and recv, CRLF, timeouts that keep partial data, writev of many pieces, backpressure,
-- refused/reset/closed peers (no SIGPIPE), close and cancel waking blocked tasks, options,
-- shutdown, one-reader rule, 1,000 connections, fd leaks, <close>, mw.resolve.
-- Only loopback traffic; every listener binds port 0 and is closed by its test.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local pack = table.pack

local TIMEOUT = { nil, "timeout", "timeout", n = 3 }
local CLOSED = { nil, "closed", "closed", n = 3 }
local CANCELLED = { nil, "cancelled", "cancelled", n = 3 }

local MiB = 1024 * 1024

-- The first three values of a failure (write adds sent_bytes as a fourth).
local function first3(r) return { r[1], r[2], r[3], n = 3 } end

-- Reads with recv until `n` bytes arrived (raising if the stream fails or ends first).
local function recv_all(s, n)
  local parts, got = {}, 0
  while got < n do
    local piece, err = s:recv(n - got)
    if not piece then error("recv failed after " .. got .. " bytes: " .. tostring(err)) end
    assert.is_true(#piece > 0 and #piece <= n - got)
    parts[#parts + 1] = piece
    got = got + #piece
  end
  return table.concat(parts)
end

describe("mw.tcp.listen", function()
  it("binds 127.0.0.1 port 0 and getsockname returns the chosen port", function()
    run(function()
      local l <close> = assert(mw.tcp.listen { host = "127.0.0.1", port = 0 })
      local host, port = l:getsockname()
      assert.equal("127.0.0.1", host)
      assert.equal("integer", math.type(port))
      assert.is_true(port > 0 and port < 65536)
      assert.is_string(tostring(l))
      assert.equal("integer", math.type(l:fileno()))
      assert.is_true(l:fileno() >= 0)
    end)
  end)

  it("defaults to host 127.0.0.1 and port 0", function()
    run(function()
      local l <close> = assert(mw.tcp.listen {})
      local host, port = l:getsockname()
      assert.equal("127.0.0.1", host)
      assert.is_true(port > 0)
    end)
  end)

  it("returns nil, err, 'EADDRINUSE' for a port another listener holds", function()
    run(function()
      local _l1 <close>, port = helper.listen()
      helper.fails("EADDRINUSE", mw.tcp.listen { host = "127.0.0.1", port = port })
    end)
  end)

  it("lets two listeners share a port with reuseport = true", function()
    run(function()
      local _l1 <close>, port = helper.listen { reuseport = true }
      local l2 <close> = assert(mw.tcp.listen { host = "127.0.0.1", port = port, reuseport = true })
      assert.equal(port, select(2, l2:getsockname()))
      assert.is_true(l2:getoption("reuseport"))
    end)
  end)

  it("resolves a host name (localhost) synchronously", function()
    run(function()
      local l <close> = assert(mw.tcp.listen { host = "localhost", port = 0 })
      local host = l:getsockname()
      assert.is_true(host == "127.0.0.1" or host == "::1", "bound to " .. tostring(host))
    end)
  end)
end)

describe("mw.tcp.connect", function()
  it("connects and exchanges data; both ends report each other's addresses", function()
    run(function()
      local l <close>, port = helper.listen()
      local server = mw.spawn(function()
        local s <close> = assert(l:accept())
        local line = assert(s:read("l"))
        assert(s:write(line:upper(), "\n"))
        local phost, pport = s:getpeername()
        local shost, sport = s:getsockname()
        assert.equal("", s:read("a"))
        return phost, pport, shost, sport
      end)
      local c = assert(mw.tcp.connect("127.0.0.1", port))
      local chost, cport = c:getsockname()
      assert.same({ "127.0.0.1", port, n = 2 }, pack(c:getpeername()))
      assert.equal("127.0.0.1", chost)
      assert(c:write("hello\n"))
      assert.equal("HELLO", c:read("l"))
      c:close()
      assert.same({ true, "127.0.0.1", cport, "127.0.0.1", port, n = 5 }, pack(server:join()))
    end)
  end)

  it("resolves a host name (localhost) on the resolver pool", function()
    run(function()
      local l <close>, port = helper.listen()
      local c <close> = assert(mw.tcp.connect("localhost", port, { timeout = 5 }))
      local s <close> = assert(l:accept(2))
      assert(c:write("via name\n"))
      assert.equal("via name", s:read("l"))
    end)
  end)

  it("binds local_host/local_port first", function()
    run(function()
      local l <close>, port = helper.listen()
      local lport = helper.free_port()
      local c <close> = assert(mw.tcp.connect("127.0.0.1", port,
        { local_host = "127.0.0.1", local_port = lport }))
      local s <close> = assert(l:accept(2))
      assert.same({ "127.0.0.1", lport, n = 2 }, pack(c:getsockname()))
      assert.same({ "127.0.0.1", lport, n = 2 }, pack(s:getpeername()))
    end)
  end)

  it("sets nodelay by default and honours the nodelay/keepalive options", function()
    run(function()
      local _l <close>, port = helper.listen()
      local a <close> = assert(mw.tcp.connect("127.0.0.1", port))
      assert.is_true(a:getoption("nodelay"))
      local b <close> = assert(mw.tcp.connect("127.0.0.1", port, { nodelay = false, keepalive = true }))
      assert.is_false(b:getoption("nodelay"))
      assert.is_true(b:getoption("keepalive"))
    end)
  end)

  it("returns nil, err, 'ECONNREFUSED' when nothing listens", function()
    run(function()
      local port = helper.free_port()
      helper.fails("ECONNREFUSED", mw.tcp.connect("127.0.0.1", port, { timeout = 5 }))
    end)
  end)

  it("times out (opts.timeout) and can be cancelled while the listener's backlog is full", function()
    run(function()
      local _l <close>, port = helper.listen { backlog = 1 }
      local conns, failure = {}, nil
      for _ = 1, 16 do
        local t0 = mw.now()
        local r = pack(mw.tcp.connect("127.0.0.1", port, { timeout = 0.2 }))
        if not r[1] then
          failure = { r = r, dt = mw.now() - t0 }
          break
        end
        conns[#conns + 1] = r[1]
      end
      assert(failure, "16 connects to a backlog-1 listener that never accepts all succeeded")
      assert.same(TIMEOUT, failure.r)
      assert.is_true(failure.dt >= 0.15 and failure.dt < 2, "connect timed out after " .. failure.dt)

      local t = mw.spawn(function() return pack(mw.tcp.connect("127.0.0.1", port)) end)
      mw.sleep(0.02)
      assert.equal("waiting", t:status())
      t:cancel()
      assert.same({ true, CANCELLED, n = 2 }, pack(t:join()))
      for _, c in ipairs(conns) do c:close() end
    end)
  end)
end)

describe("IPv6", function()
  it("listens on and connects to ::1", function()
    if not helper.has_ipv6() then
      pending("this machine has no ::1 (mw.tcp.listen{host='::1'} failed); IPv6 not tested")
    end
    run(function()
      local l <close> = assert(mw.tcp.listen { host = "::1", port = 0 })
      local host, port = l:getsockname()
      assert.equal("::1", host)
      local c <close> = assert(mw.tcp.connect("::1", port))
      local s <close> = assert(l:accept(2))
      assert.same({ "::1", port, n = 2 }, pack(c:getpeername()))
      assert.equal("::1", (s:getpeername()))
      assert(c:write("six\n"))
      assert.equal("six", s:read("l"))
      assert(s:write("back\n"))
      assert.equal("back", c:read("l"))
    end)
  end)
end)

describe("sock:read", function()
  it("'l' strips the end of line and one preceding \\r, then returns the last line, then 'closed'", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("one\ntwo\r\n\r\nthree\r\r\nfour\rfive\nlast"))
      c:shutdown("write")
      for _, want in ipairs { "one", "two", "", "three\r", "four\rfive", "last" } do
        assert.equal(want, s:read("l"))
      end
      assert.same(CLOSED, pack(s:read("l")))
      assert.same(CLOSED, pack(s:read("l")))
    end)
  end)

  it("'L' keeps the end of line", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("one\ntwo\r\nlast"))
      c:shutdown("write")
      assert.equal("one\n", s:read("L"))
      assert.equal("two\r\n", s:read("L"))
      assert.equal("last", s:read("L"))
      assert.same(CLOSED, pack(s:read("L")))
    end)
  end)

  it("'a' reads until the peer closes, then returns ''", function()
    run(function()
      local c, s <close> = helper.tcp_pair()
      mw.spawn(function()
        assert(c:write("abc"))
        mw.sleep(0.01)
        assert(c:write("def"))
        c:close()
      end)
      assert.equal("abcdef", s:read("a"))
      assert.equal("", s:read("a"))
    end)
  end)

  it("'a' returns large streams intact", function()
    run(function()
      local c, s <close> = helper.tcp_pair()
      local data = helper.pattern(3 * MiB)
      mw.spawn(function()
        assert(c:write(data))
        c:close()
      end)
      local got = s:read("a")
      assert.equal(#data, #got)
      assert.is_true(got == data, "data corrupted")
    end)
  end)

  it("n reads exactly n bytes, assembling pieces that arrive separately", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("0123456789"))
      assert.equal("0123", s:read(4))
      assert.equal("456789", s:read(6))
      local writer = mw.spawn(function()
        for ch in ("abcde"):gmatch(".") do
          assert(c:write(ch))
          mw.sleep(0.002)
        end
      end)
      assert.equal("abcde", s:read(5))
      writer:join()
    end)
  end)

  it("n at the end of stream returns 'closed' and keeps the short tail for read('a')", function()
    run(function()
      local c, s <close> = helper.tcp_pair()
      assert(c:write("xy"))
      c:close()
      assert.same(CLOSED, pack(s:read(5)))
      assert.equal("xy", s:read("a"))
    end)
  end)

  it("keeps the bytes of a timed-out read, so a retry loses nothing", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("hel"))
      local t0 = mw.now()
      assert.same(TIMEOUT, pack(s:read(5, 0.03)))
      local dt = mw.now() - t0
      assert.is_true(dt >= 0.025 and dt < 1, "read timed out after " .. dt)
      assert(c:write("lo wor"))
      assert.equal("hello", s:read(5))
      assert.same(TIMEOUT, pack(s:read("l", 0.02)))
      assert(c:write("ld\n"))
      assert.equal(" world", s:read("l"))
    end)
  end)

  it("keeps what a timed-out read('a') got, returning it all at the end of stream", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _s <close> = s
      assert(c:write("abc"))
      assert.same(TIMEOUT, pack(s:read("a", 0.03)))
      assert(c:write("def"))
      c:close()
      assert.equal("abcdef", s:read("a"))
    end)
  end)

  it("handles a CRLF split across packets and across a timed-out read", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("abc\r"))
      assert.same(TIMEOUT, pack(s:read("l", 0.03)))
      assert(c:write("\nnext\r"))
      assert.equal("abc", s:read("l"))
      assert.same(TIMEOUT, pack(s:read("L", 0.02)))
      assert(c:write("\n"))
      assert.equal("next\r\n", s:read("L"))
    end)
  end)

  it("gives nil, 'line too long', 'toolong' beyond maxline (default 1 MiB)", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert.equal(MiB, s:getoption("maxline"))
      mw.spawn(function() c:write(("x"):rep(MiB + 100), "\n") end)
      assert.same({ nil, "line too long", "toolong", n = 3 }, pack(s:read("l")))

      local c2, s2 = helper.tcp_pair()

      local _c2s2 <close> = helper.closer(c2, s2)
      s2:setoption("maxline", 16)
      assert.equal(16, s2:getoption("maxline"))
      assert(c2:write("short\n", ("y"):rep(40), "\n"))
      assert.equal("short", s2:read("l"))
      assert.same({ nil, "line too long", "toolong", n = 3 }, pack(s2:read("l")))
    end)
  end)

  it("accepts a line of exactly maxline bytes, also when its end of line arrives later", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      s:setoption("maxline", 16)
      assert(c:write(("a"):rep(16), "\n"))
      assert.equal(("a"):rep(16), s:read("l"))
      assert(c:write(("b"):rep(16)))
      assert.same(TIMEOUT, pack(s:read("l", 0.03))) -- not too long yet: the line may still end
      assert(c:write("\n"))
      assert.equal(("b"):rep(16), s:read("l"))
      -- the same with CRLF: the "\r" is the end of line's, not the line's
      assert(c:write(("c"):rep(16), "\r\n"))
      assert.equal(("c"):rep(16), s:read("l"))
      assert(c:write(("d"):rep(16), "\r"))
      assert.same(TIMEOUT, pack(s:read("l", 0.03)))
      assert(c:write("\n"))
      assert.equal(("d"):rep(16) .. "\r\n", s:read("L"))
      assert(c:write(("e"):rep(17), "\r\n"))
      assert.same({ nil, "line too long", "toolong", n = 3 }, pack(s:read("l")))
    end)
  end)

  it("maxline set on a listener is its accepted connections' limit", function()
    run(function()
      local l = assert(mw.tcp.listen { host = "127.0.0.1", port = 0 })
      local _l <close> = helper.closer(l)
      assert(l:setoption("maxline", 16))
      local _, port = l:getsockname()
      local c = assert(mw.tcp.connect("127.0.0.1", port))
      local s = assert(l:accept(5))
      local _cs <close> = helper.closer(c, s)
      assert.equal(16, s:getoption("maxline"))
      assert(c:write(("a"):rep(17), "\n"))
      assert.same({ nil, "line too long", "toolong", n = 3 }, pack(s:read("l")))
    end)
  end)

  it("uses the socket's default timeout (settimeout), overridable per call", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      s:settimeout(0.02)
      assert.same(TIMEOUT, pack(s:read("l")))
      assert.same(TIMEOUT, pack(s:recv()))
      mw.spawn(function()
        mw.sleep(0.05)
        c:write("late\n")
      end)
      assert.equal("late", s:read("l", 2))
    end)
  end)

  it("raises when a second task reads while one is reading", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      local first = mw.spawn(function() return s:read("l") end)
      mw.yield()
      assert.equal("waiting", first:status())
      local second = mw.spawn(function() return s:read("l") end)
      local ok, err = second:join()
      assert.is_false(ok)
      assert.matches("socket already has a reading task", err)
      assert(c:write("for the first\n"))
      assert.same({ true, "for the first", n = 2 }, pack(first:join()))
    end)
  end)

  it("a rejected second reader does not change the first reader's timeout", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      local first = mw.spawn(function() return pack(s:read(10)) end) -- no timeout
      mw.yield()
      local ok = pcall(s.read, s, 10, 0.01)
      assert.is_false(ok)
      assert(c:write("12345"))
      mw.sleep(0.05) -- the first reader re-waits for the rest, past the rejected 0.01 s
      assert(c:write("67890"))
      assert.same({ true, { "1234567890", n = 1 }, n = 2 }, pack(first:join()))
    end)
  end)

  it("allows one task reading while another writes the same socket", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      local reader = mw.spawn(function() return s:read("l") end)
      mw.yield()
      assert(s:write("from s\n"))
      assert.equal("from s", c:read("l"))
      assert(c:write("to s\n"))
      assert.same({ true, "to s", n = 2 }, pack(reader:join()))
    end)
  end)
end)

describe("fairness", function()
  it("a task reading data that is all buffered already does not starve the others", function()
    run(function()
      local l <close>, port = helper.listen()
      l:setoption("rcvbuf", MiB)
      local c <close> = assert(mw.tcp.connect("127.0.0.1", port))
      local s <close> = assert(l:accept(2))
      c:setoption("sndbuf", MiB)
      local size = 256 * 1024
      assert.equal(c, mw.timeout(2, c.write, c, helper.pattern(size))) -- fits the buffers
      local ticks, done = 0, false
      local ticker = mw.spawn(function()
        while not done do
          ticks = ticks + 1
          mw.yield()
        end
      end)
      mw.yield()
      local start = ticks
      for _ = 1, size // 4 do assert(s:read(4)) end -- 65,536 reads that never wait
      local during = ticks - start
      done = true
      ticker:join()
      assert.is_true(during >= 10, "the ticker ran only " .. during .. " times meanwhile")
    end)
  end)
end)

describe("sock:recv", function()
  it("returns what is available up to n, waits only when nothing is, then 'closed'", function()
    run(function()
      local c, s <close> = helper.tcp_pair()
      assert(c:write("abcdef"))
      local first = assert(s:recv(3))
      assert.is_true(#first >= 1 and #first <= 3)
      assert.equal("abcdef", first .. recv_all(s, 6 - #first))
      mw.spawn(function()
        mw.sleep(0.02)
        c:write("late")
      end)
      assert.equal("late", recv_all(s, 4))
      assert.same(TIMEOUT, pack(s:recv(10, 0.01)))
      c:close()
      assert.same(CLOSED, pack(s:recv()))
    end)
  end)

  it("returns bytes left in the buffer by read before new ones", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("line\nrest"))
      assert.equal("line", s:read("l"))
      assert.equal("rest", recv_all(s, 4))
    end)
  end)
end)

describe("sock:write", function()
  it("writes many strings and numbers in order and returns the socket", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert.equal(c, c:write("a", 1, "-", 2.5, "-", -3, "\n"))
      assert.equal("a1-2.5--3", s:read("l"))
      local parts = {}
      for i = 1, 3000 do parts[i] = ("<%d>"):format(i) end -- more pieces than IOV_MAX
      local all = table.concat(parts)
      assert.equal(c, c:write(table.unpack(parts)))
      assert.equal(all, s:read(#all))
    end)
  end)

  it("applies backpressure: 8 MiB to a slow reader completes and arrives intact", function()
    run(function()
      local l <close>, port = helper.listen()
      l:setoption("rcvbuf", 65536)
      local c <close> = assert(mw.tcp.connect("127.0.0.1", port))
      local s <close> = assert(l:accept(2))
      c:setoption("sndbuf", 65536)
      local data = helper.pattern(8 * MiB)
      local writer = mw.spawn(function() return c:write(data) end)
      mw.yield()
      assert.equal("waiting", writer:status()) -- the send buffer is full: the writer parked
      local parts, got, reads = {}, 0, 0
      while got < #data do
        local piece = assert(s:recv(65536))
        parts[#parts + 1] = piece
        got = got + #piece
        reads = reads + 1
        if reads % 16 == 0 then mw.sleep(0.001) end
      end
      assert.same({ true, c, n = 2 }, pack(writer:join()))
      local received = table.concat(parts)
      assert.equal(#data, #received)
      assert.is_true(received == data, "data corrupted")
    end, 20)
  end)

  it("times out under backpressure with nil, err, 'timeout', sent_bytes", function()
    run(function()
      local l <close>, port = helper.listen()
      l:setoption("rcvbuf", 65536)
      local c <close> = assert(mw.tcp.connect("127.0.0.1", port))
      local _s <close> = assert(l:accept(2))
      c:setoption("sndbuf", 65536)
      local data = helper.pattern(8 * MiB)

      c:settimeout(0.05)
      local r = pack(c:write(data))
      assert.same(TIMEOUT, first3(r))
      assert.equal("integer", math.type(r[4]))
      assert.is_true(r[4] > 0 and r[4] < #data, "sent " .. tostring(r[4]))

      c:settimeout(-1)
      r = pack(mw.timeout(0.05, c.write, c, data))
      assert.same(TIMEOUT, first3(r))
      assert.is_true(r[4] >= 0 and r[4] < #data)
    end)
  end)

  -- the socket's timeout bounds a wait without progress: a reader that keeps reading, slowly,
  -- gets the whole write however long it takes (mw.timeout bounds the whole call)
  it("a write to a slow, steady reader outlasting the socket's timeout goes through whole", function()
    run(function()
      local l <close> = assert(mw.tcp.listen { host = "127.0.0.1", port = 0 })
      local _, port = l:getsockname()
      l:setoption("rcvbuf", 65536)
      local c <close> = assert(mw.tcp.connect("127.0.0.1", port))
      local s <close> = assert(l:accept(2))
      c:setoption("sndbuf", 65536)
      local data = helper.pattern(2 * MiB)
      local reader = mw.spawn(function()
        local got = {}
        local n = 0
        while n < #data do
          local piece = assert(s:recv(65536))
          got[#got + 1] = piece
          n = n + #piece
          mw.sleep(0.01)
        end
        return table.concat(got)
      end)
      c:settimeout(0.2)
      local t0 = mw.now()
      assert.equal(c, c:write(data))
      assert.is_true(mw.now() - t0 > 0.2, "the write took less than the timeout: nothing shown")
      local ok, got = reader:join()
      assert.is_true(ok)
      assert.equal(data, got)
    end)
  end)

  it("to a peer that closed returns EPIPE or ECONNRESET and never raises SIGPIPE", function()
    run(function()
      local c <close>, s = helper.tcp_pair()
      s:close()
      local r
      for _ = 1, 200 do
        r = pack(c:write("ping"))
        if not r[1] then break end
        mw.sleep(0.005)
      end
      helper.fails({ "EPIPE", "ECONNRESET" }, table.unpack(r, 1, r.n))
      -- still alive, and the socket reports the same kind of failure again
      helper.fails({ "EPIPE", "ECONNRESET" }, c:write("again"))
    end)
  end)

  it("reports sent_bytes when the peer goes away in the middle of a large write", function()
    run(function()
      local l <close>, port = helper.listen()
      l:setoption("rcvbuf", 65536)
      local c <close> = assert(mw.tcp.connect("127.0.0.1", port))
      local s = assert(l:accept(2))
      c:setoption("sndbuf", 65536)
      local data = helper.pattern(8 * MiB)
      local writer = mw.spawn(function() return pack(c:write(data)) end)
      assert.equal(1000, #assert(s:read(1000)))
      s:close() -- unread data: the peer resets
      local _, r = writer:join()
      helper.fails({ "EPIPE", "ECONNRESET" }, table.unpack(r, 1, 3))
      assert.equal("integer", math.type(r[4]))
      assert.is_true(r[4] >= 1000 and r[4] < #data, "sent " .. tostring(r[4]))
    end)
  end)
end)

describe("a peer reset", function()
  it("gives ECONNRESET on read, then EPIPE/ECONNRESET on write", function()
    run(function()
      local c <close>, s = helper.tcp_pair()
      assert(c:write("x"))
      assert.equal("x", s:read(1))
      assert(s:write("k"))
      assert.equal("k", c:read(1))
      assert(c:write("unread")) -- left in the peer's kernel buffer
      mw.sleep(0.01)
      s:close() -- closing with unread data sends RST
      helper.fails("ECONNRESET", c:read("l", 2))
      helper.fails({ "EPIPE", "ECONNRESET" }, c:write("more"))
    end)
  end)
end)

describe("sock:shutdown", function()
  it("'write' (the default) gives the peer EOF while the other direction still works", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("request"))
      c:shutdown()
      assert.equal("request", s:read("a"))
      assert(s:write("response"))
      s:close()
      assert.equal("response", c:read("a"))
    end)
  end)

  it("'write' makes later writes fail with EPIPE", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      c:shutdown("write")
      helper.fails("EPIPE", c:write("after shutdown"))
      assert.equal("", s:read("a"))
    end)
  end)

  it("'both' gives the peer EOF", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("bye"))
      c:shutdown("both")
      assert.equal("bye", s:read("a"))
    end)
  end)
end)

describe("closing", function()
  it("makes every method but close raise 'attempt to use a closed socket'; closing twice is ok", function()
    run(function()
      local c, s <close> = helper.tcp_pair()
      c:close()
      c:close()
      local closed = "attempt to use a closed socket"
      helper.raises(closed, c.read, c, "l")
      helper.raises(closed, c.recv, c)
      helper.raises(closed, c.write, c, "x")
      helper.raises(closed, c.shutdown, c)
      helper.raises(closed, c.getpeername, c)
      helper.raises(closed, c.getsockname, c)
      helper.raises(closed, c.setoption, c, "nodelay", true)
      helper.raises(closed, c.getoption, c, "nodelay")
      helper.raises(closed, c.settimeout, c, 1)
      helper.raises(closed, c.fileno, c)
      assert.same(CLOSED, pack(s:read("l")))

      local l = helper.listen()
      l:close()
      l:close()
      helper.raises(closed, l.accept, l)
      helper.raises(closed, l.getsockname, l)
      helper.raises(closed, l.settimeout, l, 1)
    end)
  end)

  it("wakes a task blocked in read with nil, 'closed', 'closed'", function()
    run(function()
      local _c <close>, s = helper.tcp_pair()
      local reader = mw.spawn(function() return pack(s:read("l")) end)
      mw.yield()
      assert.equal("waiting", reader:status())
      s:close()
      assert.same({ true, CLOSED, n = 2 }, pack(reader:join()))
    end)
  end)

  it("wakes a task blocked in accept with nil, 'closed', 'closed'", function()
    run(function()
      local l = helper.listen()
      local acceptor = mw.spawn(function() return pack(l:accept()) end)
      mw.yield()
      assert.equal("waiting", acceptor:status())
      l:close()
      assert.same({ true, CLOSED, n = 2 }, pack(acceptor:join()))
    end)
  end)

  it("wakes a task blocked in write with nil, 'closed', 'closed'", function()
    run(function()
      local l <close>, port = helper.listen()
      l:setoption("rcvbuf", 65536)
      local c = assert(mw.tcp.connect("127.0.0.1", port))
      local _s <close> = assert(l:accept(2))
      c:setoption("sndbuf", 65536)
      local writer = mw.spawn(function() return pack(c:write(helper.pattern(8 * MiB))) end)
      mw.yield()
      assert.equal("waiting", writer:status())
      c:close()
      local _, r = writer:join()
      assert.same(CLOSED, first3(r))
    end)
  end)

  it("gives the peer EOF: read('l') returns 'closed' and read('a') ''", function()
    run(function()
      local c <close>, s = helper.tcp_pair()
      s:close()
      assert.same(CLOSED, pack(c:read("l")))
      assert.equal("", c:read("a"))
    end)
  end)

  it("happens when an unreferenced socket is garbage collected", function()
    run(function()
      local l <close>, port = helper.listen()
      local function open_and_drop()
        local c = assert(mw.tcp.connect("127.0.0.1", port))
        assert(c:write("dropped"))
      end
      open_and_drop()
      local s <close> = assert(l:accept(2))
      collectgarbage()
      collectgarbage()
      assert.equal("dropped", s:read("a", 2))
    end)
  end)

  it("happens for <close> variables", function()
    run(function()
      local l <close>, port = helper.listen()
      local ref
      do
        local c <close> = assert(mw.tcp.connect("127.0.0.1", port))
        ref = c
      end
      helper.raises("attempt to use a closed socket", ref.read, ref, "l")
      local s <close> = assert(l:accept(2))
      assert.equal("", s:read("a", 2))
      local lref
      do
        local l2 <close> = helper.listen()
        lref = l2
      end
      helper.raises("attempt to use a closed socket", lref.accept, lref)
    end)
  end)
end)

describe("cancelling a task blocked on a socket", function()
  it("returns nil, 'cancelled', 'cancelled' from read and leaves the socket usable", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert(c:write("par"))
      local reader = mw.spawn(function() return pack(s:read("l")) end)
      mw.yield()
      reader:cancel()
      assert.same({ true, CANCELLED, n = 2 }, pack(reader:join()))
      assert(c:write("tial\n"))
      assert.equal("partial", s:read("l"))
    end)
  end)

  it("returns nil, 'cancelled', 'cancelled' from recv", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      local t = mw.spawn(function() return pack(s:recv()) end)
      mw.yield()
      t:cancel()
      assert.same({ true, CANCELLED, n = 2 }, pack(t:join()))
      assert(c:write("z"))
      assert.equal("z", s:recv())
    end)
  end)

  it("returns nil, 'cancelled', 'cancelled' from accept and the listener still accepts", function()
    run(function()
      local l <close>, port = helper.listen()
      local t = mw.spawn(function() return pack(l:accept()) end)
      mw.yield()
      t:cancel()
      assert.same({ true, CANCELLED, n = 2 }, pack(t:join()))
      local _c <close> = assert(mw.tcp.connect("127.0.0.1", port))
      local _s <close> = assert(l:accept(2))
    end)
  end)

  it("returns nil, 'cancelled', 'cancelled', sent_bytes from a blocked write", function()
    run(function()
      local l <close>, port = helper.listen()
      l:setoption("rcvbuf", 65536)
      local c <close> = assert(mw.tcp.connect("127.0.0.1", port))
      local _s <close> = assert(l:accept(2))
      c:setoption("sndbuf", 65536)
      local writer = mw.spawn(function() return pack(c:write(helper.pattern(8 * MiB))) end)
      mw.yield()
      writer:cancel()
      local _, r = writer:join()
      assert.same(CANCELLED, first3(r))
      assert.is_true(r[4] > 0 and r[4] < 8 * MiB)
    end)
  end)
end)

describe("stale socket wake-ups", function()
  it("a read that completed early leaves no timer or readiness wake-up behind", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      local ch = mw.channel()
      local t = mw.spawn(function()
        local line = s:read("l", 0.1)
        return line, pack(ch:recv())
      end)
      mw.yield()
      assert(c:write("early\n"))
      mw.sleep(0.15) -- past the read's deadline
      assert(c:write("more\n")) -- readiness on s while t waits on the channel
      mw.sleep(0.01)
      assert.equal("waiting", t:status())
      assert.is_true(ch:send("v", 1))
      assert.same({ true, "early", { "v", n = 1 }, n = 3 }, pack(t:join()))
      assert.equal("more", s:read("l"))
    end)
  end)
end)

describe("mw.timeout around socket calls", function()
  it("times out read, recv and accept with nil, 'timeout', 'timeout'", function()
    run(function()
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      assert.same(TIMEOUT, pack(mw.timeout(0.02, function() return s:read("l") end)))
      assert.same(TIMEOUT, pack(mw.timeout(0.02, function() return s:recv() end)))
      local l <close> = helper.listen()
      assert.same(TIMEOUT, pack(mw.timeout(0.02, function() return l:accept() end)))
      -- the nearest deadline wins over a longer per-call timeout
      local t0 = mw.now()
      assert.same(TIMEOUT, pack(mw.timeout(0.02, function() return s:read("l", 5) end)))
      assert.is_true(mw.now() - t0 < 1)
    end)
  end)
end)

describe("accept", function()
  it("times out with nil, 'timeout', 'timeout' (per call and via settimeout)", function()
    run(function()
      local l <close>, port = helper.listen()
      local t0 = mw.now()
      assert.same(TIMEOUT, pack(l:accept(0.03)))
      local dt = mw.now() - t0
      assert.is_true(dt >= 0.025 and dt < 1, "accept timed out after " .. dt)
      l:settimeout(0.01)
      assert.same(TIMEOUT, pack(l:accept()))
      local _c <close> = assert(mw.tcp.connect("127.0.0.1", port))
      local _s <close> = assert(l:accept())
    end)
  end)
end)

describe("options", function()
  it("set and get nodelay, keepalive, reuseaddr, sndbuf, rcvbuf, maxline", function()
    run(function()
      local l <close> = helper.listen()
      assert.is_true(l:getoption("reuseaddr"))
      local c, s = helper.tcp_pair()
      local _cs <close> = helper.closer(c, s)
      c:setoption("nodelay", false)
      assert.is_false(c:getoption("nodelay"))
      c:setoption("nodelay", true)
      assert.is_true(c:getoption("nodelay"))
      c:setoption("keepalive", true)
      assert.is_true(c:getoption("keepalive"))
      c:setoption("keepalive", false)
      assert.is_false(c:getoption("keepalive"))
      c:setoption("sndbuf", 65536)
      assert.is_true(c:getoption("sndbuf") >= 65536)
      s:setoption("rcvbuf", 65536)
      assert.is_true(s:getoption("rcvbuf") >= 65536)
      s:setoption("maxline", 100)
      assert.equal(100, s:getoption("maxline"))
    end)
  end)
end)

describe("many connections", function()
  it("serves 1,000 concurrent loopback connections, each echoing", function()
    local before = helper.fd_count()
    local peak = run(function()
      local N = 1000
      local l, port = helper.listen { backlog = 1024 }
      local handlers = {}
      local acceptor = mw.spawn(function()
        while true do
          local s = l:accept()
          if not s then return end
          handlers[#handlers + 1] = mw.spawn(function()
            local line = s:read("l")
            if line then s:write(line, "\n") end
            s:read("a")
            s:close()
          end)
        end
      end)
      local gate = mw.channel()
      local echoed = 0
      local all_echoed = mw.channel(1)
      local clients = {}
      for i = 1, N do
        clients[i] = mw.spawn(function()
          local c <close> = assert(mw.tcp.connect("127.0.0.1", port, { timeout = 10 }))
          assert(c:write("client ", i, "\n"))
          assert.equal("client " .. i, c:read("l"))
          echoed = echoed + 1
          if echoed == N then all_echoed:send(true) end
          gate:recv() -- hold the connection open until every client has echoed
        end)
      end
      assert.is_true(all_echoed:recv())
      local peak = helper.fd_count()
      gate:close()
      for i = 1, N do
        local ok, err = clients[i]:join()
        assert(ok, err)
      end
      for _, h in ipairs(handlers) do assert(h:join()) end
      l:close()
      acceptor:join()
      assert.equal(N, #handlers)
      return peak
    end, 25)
    assert.is_true(peak - before >= 2000, "only " .. (peak - before) .. " fds open at the peak")
    collectgarbage()
    collectgarbage()
    assert.equal(before, helper.fd_count())
  end)
end)

describe("file descriptors", function()
  local function churn()
    local l, port = helper.listen()
    for _ = 1, 50 do
      local c = assert(mw.tcp.connect("127.0.0.1", port))
      local s = assert(l:accept(2))
      assert(c:write("x\n"))
      assert.equal("x", s:read("l"))
      c:close()
      assert.equal("", s:read("a"))
      s:close()
    end
    local dead = helper.free_port()
    for _ = 1, 10 do assert.is_nil((mw.tcp.connect("127.0.0.1", dead))) end
    assert.is_nil((mw.tcp.listen { host = "127.0.0.1", port = port })) -- EADDRINUSE path
    assert.is_nil((l:accept(0.001)))
    local byname = assert(mw.tcp.connect("localhost", port))
    byname:close()
    l:close()
  end

  it("are not leaked by opening and closing many sockets", function()
    run(churn) -- warm up: the runtime may open its own fds once (epoll, resolver, ...)
    collectgarbage()
    local before = helper.fd_count()
    run(churn)
    collectgarbage()
    collectgarbage()
    assert.equal(before, helper.fd_count())
  end)
end)

describe("mw.resolve", function()
  it("resolves localhost to inet/inet6 entries with the given port", function()
    run(function()
      local r = assert(mw.resolve("localhost", 8080))
      assert.is_true(#r >= 1)
      local hosts = {}
      for _, a in ipairs(r) do
        assert.is_true(a.family == "inet" or a.family == "inet6", "family " .. tostring(a.family))
        assert.is_string(a.host)
        assert.equal(8080, a.port)
        hosts[a.host] = a.family
      end
      assert.is_true(hosts["127.0.0.1"] == "inet" or hosts["::1"] == "inet6")
    end)
  end)

  it("returns literals as they are", function()
    run(function()
      local r = assert(mw.resolve("127.0.0.1", 80))
      assert.same({ family = "inet", host = "127.0.0.1", port = 80 }, r[1])
      local r6 = assert(mw.resolve("::1", 443))
      assert.same({ family = "inet6", host = "::1", port = 443 }, r6[1])
    end)
  end)

  it("can be cancelled, and the resolver keeps working afterwards", function()
    run(function()
      local t = mw.spawn(function() return pack(mw.resolve("localhost")) end)
      t:cancel() -- before it starts: its lookup returns 'cancelled'
      assert.same({ true, CANCELLED, n = 2 }, pack(t:join()))
      local c = mw.spawn(function()
        local _l <close>, port = helper.listen()
        return pack(mw.tcp.connect("localhost", port))
      end)
      c:cancel()
      assert.same({ true, CANCELLED, n = 2 }, pack(c:join()))
      mw.sleep(0.01) -- let the abandoned lookups finish
      assert.is_true(#assert(mw.resolve("localhost")) >= 1)
    end)
  end)

  it("leaves no resolver thread running when the program exits (20 child processes)", function()
    -- lua_close unloads moonwire/core.so (dlclose); a resolver thread still running its code
    -- then crashes the process with SIGSEGV after the script has finished.
    local crashes = {}
    for i = 1, 20 do
      local out, how, code = helper.subprocess([[
        local mw = require "moonwire"
        mw.run(function()
          local lookups = {}
          for i = 1, 8 do lookups[i] = mw.spawn(mw.resolve, "localhost") end
          for i = 1, 8 do assert(lookups[i]:join()) end
        end)
        print("finished")
      ]], 5)
      if not (how == "exit" and code == 0 and out:find("finished", 1, true)) then
        crashes[#crashes + 1] = ("run %d: %s %s %q"):format(i, tostring(how), tostring(code), out)
      end
    end
    assert(#crashes == 0, #crashes .. "/20 child processes did not exit cleanly:\n"
      .. table.concat(crashes, "\n"))
  end)

  it("is a blocking call: it raises outside a task", function()
    helper.raises("blocking call outside a task", mw.resolve, "localhost")
  end)

  it("serves many concurrent lookups", function()
    run(function()
      local results = {}
      local resolvers = {}
      for i = 1, 20 do
        resolvers[i] = mw.spawn(function() results[i] = assert(mw.resolve("localhost")) end)
      end
      for i = 1, 20 do assert(resolvers[i]:join()) end
      assert.equal(20, #results)
      for i = 1, 20 do assert.same(results[1], results[i]) end
    end)
  end)
end)

describe("connect outside a task", function()
  it("raises 'blocking call outside a task'", function()
    local l, port = helper.listen()
    helper.raises("blocking call outside a task", mw.tcp.connect, "127.0.0.1", port)
    l:close()
  end)
end)
