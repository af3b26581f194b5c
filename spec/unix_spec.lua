-- Unix stream sockets (docs/api.md "Unix"): listen/connect/echo, socket names, stale socket
-- files, the abstract namespace, failures, and the shared stream methods.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local pack = table.pack

local CLOSED = { nil, "closed", "closed", n = 3 }

-- Whether a file-system entry exists at `path` (io.open cannot open a socket file; renaming
-- it onto itself succeeds, or fails with ENOENT = 2 when there is nothing).
local function exists(path)
  local ok, _, code = os.rename(path, path)
  return ok == true or code ~= 2
end

-- Leaves a stale socket file at `path` (bound, then closed without unlinking), made with
-- LuaSocket when it is installed, else by a python3 child (without the ASan preload).
local function make_stale_socket(path)
  local has_unix, unix = pcall(require, "socket.unix")
  if has_unix then
    local u = assert(unix())
    assert(u:bind(path))
    u:close()
  else
    os.execute(("env -u LD_PRELOAD python3 -c "
      .. "'import socket; socket.socket(socket.AF_UNIX).bind(%q)'"):format(path))
  end
  assert(exists(path), "could not create a stale socket file at " .. path)
end

describe("mw.unix", function()
  it("listens on a path, connects and echoes; getsockname/getpeername return the path", function()
    run(function()
      local path = helper.socket_path("echo")
      local l <close> = assert(mw.unix.listen { path = path })
      assert.equal(path, l:getsockname())
      assert.is_true(exists(path))
      local server = mw.spawn(function()
        local s <close> = assert(l:accept(2))
        assert.equal(path, s:getsockname())
        local line = assert(s:read("l"))
        assert(s:write("echo: ", line, "\n"))
        return s:read("a")
      end)
      local c <close> = assert(mw.unix.connect(path))
      assert.equal(path, c:getpeername())
      assert(c:write("over unix\n"))
      assert.equal("echo: over unix", c:read("l"))
      assert(c:write("tail"))
      c:shutdown("write")
      assert.same({ true, "tail", n = 2 }, pack(server:join()))
      l:close()
      os.remove(path)
    end)
  end)

  it("removes a stale socket file first (unlink defaults to true)", function()
    local path = helper.socket_path("stale")
    make_stale_socket(path)
    run(function()
      local l <close> = assert(mw.unix.listen { path = path })
      local c <close> = assert(mw.unix.connect(path))
      local s <close> = assert(l:accept(2))
      assert(c:write("fresh\n"))
      assert.equal("fresh", s:read("l"))
    end)
    os.remove(path)
  end)

  it("with unlink = false fails with EADDRINUSE on a stale socket file", function()
    local path = helper.socket_path("keep")
    make_stale_socket(path)
    run(function()
      helper.fails("EADDRINUSE", mw.unix.listen { path = path, unlink = false })
    end)
    os.remove(path)
  end)

  it("does not take over a socket file another listener is using (it is not stale)", function()
    local path = helper.socket_path("live")
    finally(function() os.remove(path) end)
    run(function()
      local l1 <close> = assert(mw.unix.listen { path = path })
      local second = pack(mw.unix.listen { path = path })
      if second[1] then second[1]:close() end
      helper.fails("EADDRINUSE", table.unpack(second, 1, second.n))
      -- the first listener still gets the connections made to its path
      local c <close> = assert(mw.unix.connect(path))
      local s <close> = assert(l1:accept(1))
      assert(c:write("still mine\n"))
      assert.equal("still mine", s:read("l"))
    end)
  end)

  it("uses the abstract namespace for paths starting with '@'", function()
    run(function()
      local name = ("@moonwire-spec-%d-%d"):format(helper.pid(), math.random(1, 1e9))
      local l <close> = assert(mw.unix.listen { path = name })
      assert.equal(name, l:getsockname())
      assert.is_false(exists(name)) -- nothing created in the file system
      local c <close> = assert(mw.unix.connect(name))
      local s <close> = assert(l:accept(2))
      assert.equal(name, c:getpeername())
      assert(c:write("abstract\n"))
      assert.equal("abstract", s:read("l"))
      assert(s:write("reply\n"))
      assert.equal("reply", c:read("l"))
    end)
  end)

  it("returns nil, err, 'ENOENT' when the path does not exist", function()
    run(function()
      helper.fails("ENOENT", mw.unix.connect(helper.socket_path("missing")))
    end)
  end)

  it("returns nil, err, 'ECONNREFUSED' for a socket file nobody listens on", function()
    local path = helper.socket_path("refused")
    make_stale_socket(path)
    run(function()
      helper.fails("ECONNREFUSED", mw.unix.connect(path))
    end)
    os.remove(path)
  end)

  it("supports the stream methods: read formats, recv, EOF, close waking a reader", function()
    run(function()
      local path = helper.socket_path("stream")
      local l <close> = assert(mw.unix.listen { path = path })
      local c = assert(mw.unix.connect(path))
      local s <close> = assert(l:accept(2))
      assert(c:write("a\r\nb\n", 42, "xyz"))
      assert.equal("a", s:read("l"))
      assert.equal("b\n", s:read("L"))
      assert.equal("42", s:read(2))
      assert.equal("xyz", s:recv())
      local reader = mw.spawn(function() return pack(s:read("l")) end)
      mw.yield()
      c:close()
      assert.same({ true, CLOSED, n = 2 }, pack(reader:join()))
      helper.raises("attempt to use a closed socket", c.write, c, "x")
      os.remove(path)
    end)
  end)

  it("does not leak fds", function()
    local function churn()
      local path = helper.socket_path("leak")
      local l = assert(mw.unix.listen { path = path })
      for _ = 1, 30 do
        local c = assert(mw.unix.connect(path))
        local s = assert(l:accept(2))
        assert(c:write("x"))
        assert.equal("x", s:read(1))
        c:close()
        s:close()
      end
      l:close()
      os.remove(path)
    end
    run(churn)
    collectgarbage()
    local before = helper.fd_count()
    run(churn)
    collectgarbage()
    collectgarbage()
    assert.equal(before, helper.fd_count())
  end)
end)
