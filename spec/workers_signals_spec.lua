-- http.serve{ workers = N } (docs/http.md, moonwire/http/workers.lua): failures at start,
-- restarts, and the signals a supervisor and its workers get. Each server runs in a child
-- lua5.4 of its own session (setsid), killed as a process group when its test ends; this
-- process watches its log and its processes, waiting on conditions with bounded deadlines.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local readfile = helper.readfile
local core = require "moonwire.core"

local children, alive = helper.children, helper.process_alive

-- Waits up to `limit` seconds for cond() to return a true value; returns it (nil on timeout).
local function wait_for(limit, cond)
  local deadline = mw.now() + limit
  repeat
    local v = cond()
    if v then return v end
    mw.sleep(0.02)
  until mw.now() > deadline
end

-- Starts `body` (Lua, after package paths and `core`, `mw`, `http` are set) in a new session;
-- returns the supervisor's pid and a function reading its log (stdout and stderr). The
-- process group is killed and the files in `remove` are removed when the test ends (the
-- test's one `finally`: busted keeps the last one given).
local function start(body, remove)
  local base = os.tmpname()
  local script, log = base .. ".lua", base .. ".log"
  local f = assert(io.open(script, "w"))
  f:write(("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath))
  f:write([[
local core = require "moonwire.core"
local mw = require "moonwire"
local http = require "moonwire.http"
io.stdout:setvbuf("line")
io.stderr:setvbuf("line")
io.stdout:write("pid ", core.getpid(), "\n")
]], body)
  f:close()
  local preload = os.getenv("MW_ASAN_PRELOAD")
  local env = preload and ("env LD_PRELOAD=" .. preload .. " ") or ""
  assert(os.execute(("(%ssetsid lua5.4 %s >%s 2>&1 &)"):format(env, script, log)))
  local function text() return readfile(log) or "" end
  local pid = tonumber(wait_for(5, function() return text():match("pid (%d+)") end))
  finally(function()
    if pid then
      core.kill(-pid, "SIGKILL")              -- its process group: the supervisor and its workers
      core.kill(pid, "SIGKILL")
    end
    for _, name in ipairs{ base, script, log, table.unpack(remove or {}) } do os.remove(name) end
  end)
  assert(pid, "the server script did not start: " .. text())
  return pid, text
end

-- serve options of a plain server that prints "listening" once on_listen runs
local LISTEN = [[host = "127.0.0.1", port = 0,
  on_listen = function(info) io.stdout:write("listening ", info.port, "\n") end,]]

describe("http.serve with workers: failures at start", function()
  it("a bad option fails in every worker: serve raises it, no on_listen, no restarts, no child left", function()
    run(function()
      local _, text = start(([[
local ok, err = pcall(http.serve, { workers = 2, handler = "not a function", %s })
io.stdout:write("serve returned ", tostring(ok), " ", tostring(err), "\n")
io.stdout:write("children left: ", tostring((core.waitpid(-1))), "\n")
]]):format(LISTEN))
      assert.truthy(wait_for(8, function() return text():find("children left") end), text())
      local out = text()
      assert.matches("serve returned false bad option 'handler' %(function expected, got string%)", out)
      assert.matches("children left: nil", out)     -- every worker was reaped
      assert.not_matches("listening", out)
      assert.not_matches("restarting", out)
    end, 15)
  end)

  it("one worker that cannot listen: the others are stopped, serve raises its error", function()
    run(function()
      local token = os.tmpname()               -- the first worker to remove it fails
      local _, text = start(([[
local server = require "moonwire.http.server"
local orig = server.server
server.server = function(o)
  if os.remove(%q) then return nil, "boom" end
  return orig(o)
end
local ok, err = pcall(http.serve, { workers = 3, handler = function(_, res) res:send("x") end, %s })
io.stdout:write("serve returned ", tostring(ok), " ", tostring(err), "\n")
io.stdout:write("children left: ", tostring((core.waitpid(-1))), "\n")
]]):format(token, LISTEN), { token })
      assert.truthy(wait_for(8, function() return text():find("children left") end), text())
      local out = text()
      assert.matches("serve returned false cannot listen: boom", out)
      assert.matches("children left: nil", out)
      assert.not_matches("listening", out)
      assert.not_matches("restarting", out)
    end, 15)
  end)
  -- on_listen's error ended the supervisor's run without stopping anything: its workers went on
  -- serving, orphaned
  it("an error in on_listen stops the workers: serve raises it, no child left", function()
    run(function()
      local _, text = start([[
local ok, err = pcall(http.serve, { workers = 2, host = "127.0.0.1", port = 0,
  handler = function(_, res) res:send("x") end,
  on_listen = function() error("boom in on_listen", 0) end })
io.stdout:write("serve returned ", tostring(ok), " ", tostring(err), "\n")
io.stdout:write("children left: ", tostring((core.waitpid(-1))), "\n")
]])
      assert.truthy(wait_for(8, function() return text():find("children left") end), text())
      local out = text()
      assert.matches("serve returned false boom in on_listen", out)
      assert.matches("children left: nil", out)
    end, 15)
  end)
end)

describe("http.serve with workers: restarts", function()
  it("a worker that keeps dying is restarted after a doubling delay, each restart logged", function()
    run(function()
      local sup, text = start(([[
http.serve{ workers = 2, handler = function(_, res) res:send("x") end, %s }
]]):format(LISTEN))
      assert.truthy(wait_for(5, function() return text():find("listening") end), text())
      local first = children(sup)
      assert.equal(2, #first)
      local victim = first[1]
      for round, delay in ipairs{ "0.1", "0.2", "0.4" } do
        os.execute("kill -9 " .. victim)
        assert.truthy(wait_for(3, function()
          return text():find("worker " .. victim .. " exited (signal 9), restarting in " .. delay .. " s", 1, true)
        end), "round " .. round .. ": " .. text())
        -- its replacement (another pid beside the sibling that stays)
        local now = wait_for(3, function()
          local c = children(sup)
          if #c == 2 and c[1] ~= victim and c[2] ~= victim then return c end
        end)
        assert.truthy(now, "round " .. round .. ": no replacement")
        victim = now[1] == first[2] and now[2] or now[1]
      end
      assert.truthy(alive(first[2]))
    end, 15)
  end)
end)

-- workers whose server.server takes 1 s once the file `slow` exists (a slow key load...),
-- saying "starting <pid>" first: a window where a worker runs but does not listen yet
local SLOW = [[
local server = require "moonwire.http.server"
local orig = server.server
server.server = function(o)
  if io.open(%q) then
    io.stderr:write("starting ", core.getpid(), "\n")
    mw.sleep(1)
  end
  return orig(o)
end
http.serve{ workers = 2, handler = function(_, res) res:send("x") end, %s }
io.stdout:write("supervisor done\n")
]]

describe("http.serve with workers: signals", function()
  it("SIGTERM to a worker still starting stops that worker only", function()
    run(function()
      local slow = os.tmpname()
      os.remove(slow)
      local sup, text = start(SLOW:format(slow, LISTEN), { slow })
      assert.truthy(wait_for(5, function() return text():find("listening") end), text())
      local first = children(sup)
      assert.equal(2, #first)
      assert(io.open(slow, "w")):close()
      os.execute("kill -9 " .. first[1])
      local starting = tonumber(wait_for(3, function() return text():match("starting (%d+)") end))
      assert.truthy(starting, text())
      os.execute("kill -TERM " .. starting)
      -- it ends once its server.server returns, instead of listening; its sibling lives on
      assert.truthy(wait_for(5, function() return not alive(starting) end), "the starting worker ignored SIGTERM")
      assert.truthy(wait_for(3, function()
        return text():find("worker " .. starting .. " exited (exit 0)", 1, true)
      end), text())
      assert.truthy(alive(first[2]), "its sibling was stopped too")
      assert.not_matches("worker " .. first[2] .. " exited", text())
    end, 15)
  end)

  it("SIGINT to the process group while the workers start: all stop, on_listen never runs", function()
    run(function()
      local slow = os.tmpname()                -- exists: every worker starts slowly
      local sup, text = start(SLOW:format(slow, LISTEN), { slow })
      assert.truthy(wait_for(5, function()
        local _, k = text():gsub("starting %d+", "")
        return k == 2
      end), text())
      core.kill(-sup, "SIGINT")                -- Ctrl-C in a terminal
      assert.truthy(wait_for(6, function() return not alive(sup) end), "the supervisor hangs: " .. text())
      assert.matches("supervisor done", text())
      assert.not_matches("listening", text())
    end, 15)
  end)

  it("SIGHUP: the supervisor passes it on, a worker without TLS ignores it", function()
    run(function()
      local sup, text = start(([[
http.serve{ workers = 2, handler = function(_, res) res:send("x") end, %s }
io.stdout:write("supervisor done\n")
]]):format(LISTEN))
      assert.truthy(wait_for(5, function() return text():find("listening") end), text())
      local first = children(sup)
      assert.equal(2, #first)
      -- SIGHUP then SIGTERM to a worker: dead of SIGHUP, it would exit by signal 1
      os.execute("kill -HUP " .. first[1] .. "; kill -TERM " .. first[1])
      assert.truthy(wait_for(5, function()
        return text():match("worker " .. first[1] .. " exited %(%a+ %d+%)")
      end), text())
      assert.matches("worker " .. first[1] .. " exited (exit 0)", text(), 1, true)
      -- to the supervisor (it passes it on), then SIGTERM: it must live to stop cleanly
      os.execute("kill -HUP " .. sup .. "; kill -TERM " .. sup)
      assert.truthy(wait_for(5, function() return not alive(sup) end), text())
      assert.matches("supervisor done", text())
      assert.not_matches("signal 1%)", text())
    end, 15)
  end)

  -- a server whose handler spins on /spin (a bug, a blocking call): that worker never reads
  -- its SIGTERM again
  local SPIN = [[
http.serve{ workers = 2, %s
  handler = function(req, res)
    if req.path == "/spin" then io.stderr:write("spinning\n") while true do end end
    res:send("x")
  end, %s }
io.stdout:write("supervisor done\n")
]]
  local function spin(sup, text)
    local port = tonumber(wait_for(5, function() return text():match("listening (%d+)") end))
    assert.truthy(port, text())
    local sock = assert(mw.tcp.connect("127.0.0.1", port))
    assert(sock:write("GET /spin HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert.truthy(wait_for(5, function() return text():find("spinning") end), text())
    assert.equal(2, #children(sup))
    return sock
  end

  it("a worker stuck past its grace is killed", function()
    run(function()
      local sup, text = start(SPIN:format("grace = 1,", LISTEN))
      local sock = spin(sup, text)
      local t0 = mw.now()
      os.execute("kill -TERM " .. sup)
      -- grace (1 s) + the margin (5 s), with room
      assert.truthy(wait_for(9, function() return not alive(sup) end), "the supervisor hangs: " .. text())
      assert.is_true(mw.now() - t0 >= 1)
      assert.matches("killing them", text())
      assert.matches("supervisor done", text())
      sock:close()
    end, 15)
  end)

  it("a second SIGTERM/SIGINT kills the workers at once", function()
    run(function()
      local sup, text = start(SPIN:format("", LISTEN))   -- grace: 10 s
      local sock = spin(sup, text)
      os.execute("kill -TERM " .. sup)
      -- the idle worker stops at once: the supervisor has handled the first signal
      assert.truthy(wait_for(5, function() return #children(sup) == 1 end), text())
      os.execute("kill -INT " .. sup)
      assert.truthy(wait_for(3, function() return not alive(sup) end), "the supervisor waits: " .. text())
      assert.matches("supervisor done", text())
      sock:close()
    end, 15)
  end)
end)

-- A process that is gone, or a zombie nobody reaps (an orphan's new parent may not wait).
local function gone(pid)
  local stat = readfile("/proc/" .. pid .. "/stat")
  return not stat or stat:match("^%d+ %b() (%a)") == "Z"
end

describe("http.serve with workers: a supervisor killed outright", function()
  it("SIGKILL to the supervisor: its workers stop (they get SIGTERM) instead of living on", function()
    run(function()
      local sup, text = start(([[
http.serve{ workers = 2, %s handler = function(_, res) res:send("x") end }
]]):format(LISTEN))
      local port = tonumber(wait_for(5, function() return text():match("listening (%d+)") end))
      assert.truthy(port, text())
      local workers = children(sup)
      assert.equal(2, #workers)
      core.kill(sup, "SIGKILL")
      for _, pid in ipairs(workers) do
        assert.truthy(wait_for(5, function() return gone(pid) end), "worker " .. pid .. " lives on: " .. text())
      end
      assert.is_nil(mw.tcp.connect("127.0.0.1", port))   -- nobody listens on the port any more
    end, 15)
  end)
end)

describe("http.serve option 'workers'", function()
  it("raises for anything but a positive integer (nil: one process)", function()
    local http = require "moonwire.http"
    -- (had it run a server, on_listen raises and serve returns)
    local function never() error("a server ran", 0) end
    for _, w in ipairs{ "4", 0, -1, 2.5, 2.0, true } do
      local ok, err = pcall(http.serve, { host = "127.0.0.1", port = 0, workers = w,
        handler = function() end, on_listen = never })
      assert.is_false(ok)
      assert.matches("bad option 'workers' %(positive integer expected%)", err, nil, false)
    end
  end)

  -- Regression: each worker listened on the Unix path itself; the second found it taken and
  -- serve raised "cannot listen: Address already in use"
  it("raises with unix (workers share a TCP port)", function()
    local http = require "moonwire.http"
    local ok, err = pcall(http.serve, { unix = helper.socket_path("workers"), workers = 2,
      handler = function() end, on_listen = function() error("a server ran", 0) end })
    assert.is_false(ok)
    assert.matches("bad option 'workers' (not with 'unix'", err, 1, true)
  end)
end)

describe("http.serve with workers: fork failures", function()
  -- a fork that failed at a restart made no process, so no SIGCHLD ever brought the slot back:
  -- the server ran a worker short for good
  it("a restart whose fork fails is tried again", function()
    run(function()
      local sup, text = start(([[
local real, calls = core.fork, 0
core.fork = function()
  calls = calls + 1
  if calls == 3 then return nil, "Resource temporarily unavailable", 11 end
  return real()
end
http.serve{ workers = 2, handler = function(_, res) res:send("x") end, %s }
]]):format(LISTEN))
      assert.truthy(wait_for(5, function() return text():find("listening") end), text())
      local first = children(sup)
      assert.equal(2, #first)
      os.execute("kill -9 " .. first[1])
      assert.truthy(wait_for(3, function() return text():find("fork failed", 1, true) end), text())
      local now = wait_for(5, function()
        local c = children(sup)
        if #c == 2 and c[1] ~= first[1] and c[2] ~= first[1] then return c end
      end)
      assert.truthy(now, "the slot was not started again: " .. text())
    end, 15)
  end)
end)
