-- Argument checking (docs/api.md conventions): misuse raises, and the message names the
-- argument, e.g. "bad argument #1 to 'sleep' (number expected, got string)". Each call is made
-- the way a script writes it (`mw.sleep("x")`, `s:read("z")`) from a closure, and never as a
-- tail call, so the function name and the method's argument numbering are Lua's own. Calls
-- that may block are checked inside a task, so the message is about the argument.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local raises = helper.raises

local function noop() end

describe("bad arguments to the task functions", function()
  it("mw.sleep('x') names argument #1 and the expected type", function()
    run(function()
      raises("bad argument #1 to 'sleep' (number expected, got string)", function() mw.sleep("x") end)
      raises("bad argument #1 to 'sleep'", function() mw.sleep() end)
    end)
  end)

  it("mw.spawn(1) names argument #1", function()
    raises("bad argument #1 to 'spawn'", function() mw.spawn(1) end)
    raises("bad argument #1 to 'spawn'", function() mw.spawn() end)
  end)

  it("mw.run(1) names argument #1", function()
    raises("bad argument #1 to 'run'", function() mw.run(1) end)
  end)

  it("mw.timeout names its arguments", function()
    run(function()
      raises("bad argument #1 to 'timeout'", function() mw.timeout("soon", noop) end)
      raises("bad argument #2 to 'timeout'", function() mw.timeout(1, "not a function") end)
    end)
  end)

  it("task:join('x') names argument #1", function()
    run(function()
      local t = mw.spawn(noop)
      raises("bad argument #1 to 'join'", function() t:join("x") end)
      t:join()
    end)
  end)

  it("mw.on_error(1) names argument #1", function()
    raises("bad argument #1 to 'on_error'", function() mw.on_error(1) end)
  end)

  it("mw.signal names an unknown signal and a bad handler", function()
    raises("bad argument #1 to 'signal'", function() mw.signal("SIGNOTREAL", noop) end)
    raises("bad argument #2 to 'signal'", function() mw.signal("SIGUSR2", 42) end)
  end)
end)

describe("bad arguments to channels", function()
  it("mw.channel(-1), mw.channel('x') and mw.channel(1.5) name argument #1", function()
    raises("bad argument #1 to 'channel'", function() mw.channel(-1) end)
    raises("bad argument #1 to 'channel'", function() mw.channel("x") end)
    raises("bad argument #1 to 'channel'", function() mw.channel(1.5) end)
  end)

  it("ch:send(nil) and bad timeouts name the argument", function()
    run(function()
      local ch = mw.channel(1)
      raises("bad argument #1 to 'send'", function() ch:send(nil) end)
      raises("bad argument #2 to 'send'", function() ch:send(1, "x") end)
      raises("bad argument #1 to 'recv'", function() ch:recv("x") end)
    end)
  end)
end)

describe("bad arguments to sockets", function()
  it("mw.tcp.listen names the bad field", function()
    run(function()
      raises("port", function() mw.tcp.listen { port = "x" } end)
      raises("port", function() mw.tcp.listen { port = 70000 } end)
      raises("backlog", function() mw.tcp.listen { port = 0, backlog = "many" } end)
      raises("bad argument #1 to 'listen'", function() mw.tcp.listen("127.0.0.1") end)
    end)
  end)

  it("mw.tcp.connect names the bad argument", function()
    run(function()
      raises("bad argument #1 to 'connect'", function() mw.tcp.connect(nil, 80) end)
      raises("bad argument #2 to 'connect'", function() mw.tcp.connect("127.0.0.1", "http") end)
      raises("bad argument #3 to 'connect'", function() mw.tcp.connect("127.0.0.1", 80, "fast") end)
      raises("timeout", function() mw.tcp.connect("127.0.0.1", 80, { timeout = "soon" }) end)
    end)
  end)

  it("a NaN timeout option raises (NaN is no 'no timeout', docs/api.md), as a NaN timeout argument does", function()
    run(function()
      local l <close> = assert(mw.tcp.listen { port = 0 })
      local _, port = l:getsockname()
      raises("bad option 'timeout' (not a number)", function()
        mw.tcp.connect("127.0.0.1", port, { timeout = 0 / 0 })
      end)
      raises("bad option 'timeout' (not a number)", function() mw.tcp.listen { port = 0, timeout = 0 / 0 } end)
      raises("bad option 'timeout' (not a number)", function() mw.unix.connect("@mw-nan", { timeout = 0 / 0 }) end)
    end)
  end)

  it("mw.unix.listen/connect name the bad argument", function()
    run(function()
      raises("path", function() mw.unix.listen { path = {} } end)
      raises("path", function() mw.unix.listen {} end)
      raises("bad argument #1 to 'connect'", function() mw.unix.connect({}) end)
    end)
  end)

  it("mw.resolve(nil) names argument #1", function()
    run(function()
      raises("bad argument #1 to 'resolve'", function() mw.resolve(nil) end)
    end)
  end)

  it("socket methods name the bad argument", function()
    run(function()
      local c, s = helper.tcp_pair()
      raises("bad argument #1 to 'read'", function() s:read("z") end)
      raises("bad argument #1 to 'read'", function() s:read({}) end)
      raises("bad argument #2 to 'read'", function() s:read("l", "soon") end)
      raises("bad argument #1 to 'recv'", function() s:recv("x") end)
      raises("bad argument #1 to 'write'", function() c:write({}) end)
      raises("bad argument #3 to 'write'", function() c:write("a", "b", true) end)
      raises("bad argument #1 to 'shutdown'", function() c:shutdown("sideways") end)
      raises("bad argument #1 to 'setoption'", function() c:setoption("no-such-option", 1) end)
      raises("bad argument #1 to 'getoption'", function() c:getoption("no-such-option") end)
      raises("bad argument #1 to 'settimeout'", function() c:settimeout("x") end)
      -- a raising call leaves the socket usable
      assert(c:write("still fine\n"))
      assert.equal("still fine", s:read("l"))
      c:close()
      s:close()
    end)
  end)

  it("listener methods name the bad argument", function()
    run(function()
      local l = helper.listen()
      raises("bad argument #1 to 'accept'", function() l:accept("x") end)
      raises("bad argument #1 to 'settimeout'", function() l:settimeout({}) end)
      l:close()
    end)
  end)
end)
