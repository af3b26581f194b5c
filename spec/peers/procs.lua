-- spec/peers/procs.lua: external programs for the WebSocket specs, run in the background so the
-- event loop (and the server it runs) keeps going while they work.
--   procs.shell(cmd, limit)   runs a command to its end, polled with mw.sleep (bounded)
--   procs.start(cmd, limit)   starts a long-running peer (a server): :wait_event(), :stop()
--   procs.kv(text)            "key=value" lines -> table; procs.events(text) -> list of tables
-- Every program runs under `timeout`, so none outlives its limit even if the spec dies.

local mw = require "moonwire"

local P = {}

-- The repository root, absolute (this file is <root>/spec/peers/procs.lua).
local function root_dir()
  local src = debug.getinfo(1, "S").source:match("^@(.*)$") or "spec/peers/procs.lua"
  local dir = src:match("^(.*)/spec/peers/[^/]*$") or "."
  if dir:sub(1, 1) ~= "/" then
    local pwd = os.getenv("PWD")   -- checked: a stale PWD (make -C) would point elsewhere
    local f = pwd and io.open(pwd .. "/" .. src, "rb")
    if f then f:close() else pwd = nil end
    if not pwd then
      local p = assert(io.popen("pwd"))
      pwd = p:read("l")
      p:close()
    end
    dir = dir == "." and pwd or (pwd .. "/" .. dir)
  end
  return dir
end
P.root = root_dir()
P.peers = P.root .. "/spec/peers"
P.PYTHON = "/usr/bin/python3"   -- Debian's python: python3-websockets belongs to it
P.NODE = "/usr/bin/node"
P.CHROMIUM = "/usr/bin/chromium"

function P.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

P.readfile = require("spec.helper").readfile

function P.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- `env LUA_PATH=... LUA_CPATH=...` for a child lua5.4 that loads this same build tree (the
-- ASan runtime too, under `make test-asan`, as helper.subprocess does).
function P.lua_env()
  local preload = os.getenv("MW_ASAN_PRELOAD")
  return ("env LUA_PATH=%s LUA_CPATH=%s%s"):format(P.quote(package.path), P.quote(package.cpath),
    preload and (" LD_PRELOAD=" .. P.quote(preload)) or "")
end

-- Waits (bounded, from the loop) until cond() holds; returns whether it did.
function P.wait_for(cond, limit)
  local deadline = mw.now() + (limit or 10)
  while not cond() do
    if mw.now() > deadline then return false end
    mw.sleep(0.01)
  end
  return true
end

-- Runs a shell command in the background, killed after `limit` seconds, and waits (from the
-- loop, without blocking it) for its exit. Returns exit code, stdout, stderr.
function P.shell(cmd, limit)
  limit = limit or 20
  local base = os.tmpname()
  local out, err, rc = base .. ".out", base .. ".err", base .. ".rc"
  local script = ("(timeout -k 2 %d sh -c %s) >%s 2>%s </dev/null; echo $? >%s.tmp; mv %s.tmp %s")
    :format(limit, P.quote(cmd), out, err, rc, rc, rc)
  assert(os.execute("(" .. script .. ") >/dev/null 2>&1 &"))
  local code
  local finished = P.wait_for(function()
    local s = P.readfile(rc)
    code = s and math.tointeger(tonumber(s))
    return code ~= nil
  end, limit + 5)
  local o, e = P.readfile(out) or "", P.readfile(err) or ""
  for _, f in ipairs { base, out, err, rc } do os.remove(f) end
  if not finished then error("command did not finish in time: " .. cmd, 2) end
  return code, o, e
end

-- "key=value" lines -> table (the last value of a key wins).
function P.kv(text)
  local t = {}
  for line in (text or ""):gmatch("[^\n]+") do
    local k, v = line:match("^([^=\t]+)=(.*)$")
    if k then t[k] = v end
  end
  return t
end

-- Lines of tab-separated key=value pairs -> list of tables.
function P.events(text)
  local list = {}
  for line in (text or ""):gmatch("[^\n]+") do
    local e = {}
    for pair in line:gmatch("[^\t]+") do
      local k, v = pair:match("^([^=]+)=(.*)$")
      if k then e[k] = v end
    end
    if next(e) then list[#list + 1] = e end
  end
  return list
end

local Proc = {}
Proc.__index = Proc

-- The events printed so far.
function Proc:events()
  return P.events(P.readfile(self.out))
end

-- Waits (bounded) for the first event for which pred(event) holds; returns it, or raises with
-- what the program printed.
function Proc:wait_event(pred, limit)
  local found
  local ok = P.wait_for(function()
    for _, e in ipairs(self:events()) do
      if pred(e) then
        found = e
        return true
      end
    end
    return not self:alive()
  end, limit or 10)
  if not found then
    error(("%s: expected event not seen (%s); stdout:\n%s\nstderr:\n%s"):format(self.name,
      ok and "the program exited" or "timed out", P.readfile(self.out) or "", P.readfile(self.err) or ""), 2)
  end
  return found
end

function Proc:alive()
  local stat = P.readfile("/proc/" .. self.pid .. "/stat")
  if not stat then return false end
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= "Z" and state ~= "X"
end

-- Ends the program (SIGTERM to the `timeout` that runs it, which passes it on) and, inside a
-- task, waits a little for it to go.
function Proc:stop()
  if self.stopped then return end
  self.stopped = true
  if self:alive() then os.execute("kill -TERM " .. self.pid .. " 2>/dev/null") end
  if mw.current() then P.wait_for(function() return not self:alive() end, 3) end
  os.remove(self.out)
  os.remove(self.err)
end
Proc.__close = Proc.stop

-- Starts a long-running program in the background (under `timeout limit`); returns a Proc
-- (to-be-closed: `local srv <close> = procs.start(...)` stops it however the test ends).
function P.start(name, cmd, limit)
  local base = os.tmpname()
  local self = setmetatable({ name = name, out = base .. ".out", err = base .. ".err" }, Proc)
  local pidfile = base .. ".pid"
  -- a simple background command: $! is the pid of `timeout` itself
  assert(os.execute(("timeout -k 2 %d %s >%s 2>%s </dev/null & echo $! >%s")
    :format(limit or 60, cmd, self.out, self.err, pidfile)))
  self.pid = assert(math.tointeger(tonumber(P.readfile(pidfile))), "no pid for " .. name)
  os.remove(pidfile)
  os.remove(base)
  return self
end

return P
