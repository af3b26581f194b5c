--- Multi-process serving: N forked workers share the port through SO_REUSEPORT (the kernel
-- spreads connections over their listeners); the parent supervises them: a worker that dies
-- is restarted, SIGTERM/SIGINT stop them all gracefully, SIGHUP is passed on to them.
local mw = require "moonwire"
local core = require "moonwire.core"
local server = require "moonwire.http.server"
local bus = require "moonwire.pubsub.bus"

local M = {}

-- A worker that keeps dying is not restarted in a hot loop: its slot waits RESTART_MIN
-- seconds, doubling at each death up to RESTART_MAX, back to RESTART_MIN once a worker of
-- that slot lived RESTART_RESET seconds.
local RESTART_MIN, RESTART_MAX, RESTART_RESET = 0.1, 5, 10
-- On stop, a worker has its server's `grace` to finish its requests; one still running this
-- much later (a handler in a loop never reads its SIGTERM) is killed.
local KILL_MARGIN = 5
local READY_TIMEOUT = 30   -- seconds a worker may take to listen before on_listen goes ahead

-- The worker's process, from just after fork; never returns. It reports on `ready` once
-- it listens ("1") or why it cannot (the error message; the supervisor raises it).
local function worker_main(opts, ready)
  local srv, stop_requested = nil, false
  local function stop()
    stop_requested = true
    if srv then srv:close() end
  end
  -- first, before anything can yield: fork copied the supervisor's handlers, which in a
  -- worker would signal its siblings and wait for children it does not have
  mw.signal("SIGTERM", stop)
  mw.signal("SIGINT", stop)
  mw.signal("SIGHUP", function()
    -- certificate rotation; without TLS a SIGHUP (the supervisor passes its own on) is ignored
    if srv and srv.tls then
      local ok, rerr = srv.tls:reload()
      if not ok then srv.error_log("moonwire: TLS reload failed: " .. tostring(rerr)) end
    end
  end)
  mw.signal("SIGCHLD", nil)
  bus.forked()
  local ok, s, err = pcall(server.server, opts)
  if ok and not s then ok, s = false, "cannot listen: " .. tostring(err) end
  if not ok then
    -- nobody reads (a restarted worker's supervisor does not wait): say it here
    if not ready:write(tostring(s)) then io.stderr:write("moonwire: worker: ", tostring(s), "\n") end
    ready:close()
    return 1
  end
  srv = s
  if stop_requested then   -- stopped while it started: it never listens for the supervisor
    ready:close()
    srv:close()
    server.close_pubsub()
    return 0
  end
  ready:write("1")                 -- the parent's on_listen waits for every worker's listener
  ready:close()
  srv._accept:join()
  srv:close()
  server.close_pubsub()
  return 0
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

function M.serve(opts)
  if mw.current() then error("http.serve with workers must be called outside mw.run", 3) end
  local n = opts.workers
  if math.type(n) ~= "integer" or n < 1 then error("bad option 'workers' (positive integer expected)", 3) end
  -- (SO_REUSEPORT shares a TCP port: each worker's Unix listener found the path taken, and
  -- serve said "cannot listen: Address already in use")
  if opts.unix then error("bad option 'workers' (not with 'unix': workers share a TCP port)", 3) end
  -- reserve the port (bound, not listening: it takes no connections) so port = 0 works
  local reserve, err = mw.tcp.listen{ host = opts.host or "127.0.0.1", port = opts.port or 8080,
    reuseport = true, listen = false }
  if not reserve then error("cannot listen: " .. tostring(err), 2) end
  local host, port = reserve:getsockname()
  local wopts = copy(opts)
  wopts.host, wopts.port, wopts.reuseport, wopts.workers = host, port, true, nil
  local grace = type(opts.grace) == "number" and opts.grace or 10   -- server.lua's default

  local failure
  mw.run(function()
    local children, count = {}, 0
    local slots = {}                   -- slot -> { delay = next restart delay, born = mw.now() }
    local stopping, starting = false, true
    local halted = mw.channel()        -- closed when stopping: restarts waiting give up
    local gone = mw.channel()          -- closed when stopping and every worker was reaped
    local died_starting = {}           -- slots whose worker died before the startup was over
    if opts.bus ~= false then bus.hub_start() end   -- moonwire.pubsub between the workers

    -- Forks the worker of `slot`; returns the parent's end of a pair on which the worker
    -- writes "1" once it listens, or why it cannot (EOF if it dies first).
    local function start_worker(slot)
      local ready, ready_w = core.unix.pair()
      -- (a supervisor killed, even with SIGKILL, stops its workers as SIGTERM does)
      local pid, ferr = core.fork("SIGTERM")
      if not pid then
        io.stderr:write("moonwire: fork failed: ", tostring(ferr), "\n")
        ready:close()
        ready_w:close()
        return nil, "fork failed: " .. tostring(ferr)
      end
      if pid == 0 then                           -- the worker: never returns to this code
        ready:close()
        reserve:close()
        local wok, code = pcall(worker_main, wopts, ready_w)
        if not wok then io.stderr:write("moonwire: worker: ", tostring(code), "\n") end
        io.stdout:flush()
        os.exit(wok and code or 1, false)
      end
      ready_w:close()
      children[pid] = slot
      count = count + 1
      slots[slot] = slots[slot] or { delay = RESTART_MIN }
      slots[slot].born = mw.now()
      return ready
    end

    local function signal_all(sig)
      for pid in pairs(children) do core.kill(pid, sig) end
    end

    local function check_gone()
      if stopping and count == 0 and not gone:closed() then gone:close() end
    end

    -- The slot's next delay (doubled for the one after).
    local function backoff(s)
      local delay = s.delay
      s.delay = math.min(delay * 2, RESTART_MAX)
      return delay
    end

    local function restart(slot, pid, how, code)
      local s = slots[slot]
      if mw.now() - s.born >= RESTART_RESET then s.delay = RESTART_MIN end
      local delay = backoff(s)
      io.stderr:write(("moonwire: worker %d exited (%s %d), restarting in %g s\n"):format(pid, how, code, delay))
      mw.spawn(function()
        repeat
          halted:recv(delay)                     -- returns early when stopping
          if stopping then return end
          local ready = start_worker(slot)
          -- (no process made: fork failed, EAGAIN or ENOMEM, so no SIGCHLD will bring this
          -- slot back: it is tried again after its backoff)
          if ready then ready:close() else delay = backoff(s) end
        until ready
      end)
    end

    mw.signal("SIGCHLD", function()
      while true do
        local pid, how, code = core.waitpid(-1)
        if not pid or pid == 0 then break end
        local slot = children[pid]
        if slot then
          children[pid] = nil
          count = count - 1
          if starting then died_starting[#died_starting + 1] = { slot, pid, how, code }
          elseif not stopping then restart(slot, pid, how, code) end
        end
      end
      check_gone()
    end)

    local function stop()
      if stopping then                           -- a second SIGTERM/SIGINT: no more grace
        if count > 0 then io.stderr:write("moonwire: stopping again, killing the workers\n") end
        signal_all("SIGKILL")
        return
      end
      stopping = true
      halted:close()
      signal_all("SIGTERM")
      check_gone()
      if gone:closed() then return end
      gone:recv(grace + KILL_MARGIN)
      if not gone:closed() then
        io.stderr:write(("moonwire: workers still running %g s after SIGTERM, killing them\n"):format(
          grace + KILL_MARGIN))
        signal_all("SIGKILL")
      end
    end
    mw.signal("SIGTERM", stop)
    mw.signal("SIGINT", stop)
    mw.signal("SIGHUP", function() signal_all("SIGHUP") end)

    local function cleanup()
      for _, s in ipairs{ "SIGTERM", "SIGINT", "SIGHUP", "SIGCHLD" } do mw.signal(s, nil) end
      reserve:close()
      bus.hub_stop()
    end

    -- on_listen once every worker listens (a client told the port at once is not refused);
    -- a worker that cannot (a bad option, a certificate that does not load) stops them all
    local readies = {}
    for i = 1, n do
      local ready, ferr = start_worker(i)
      if not ready then
        failure = failure or "cannot start worker " .. i .. ": " .. ferr
        break
      end
      readies[#readies + 1] = ready
    end
    for _, ready in ipairs(readies) do
      local msg = ready:read("a", READY_TIMEOUT)
      ready:close()
      if msg and msg ~= "" and msg ~= "1" then failure = failure or msg end
    end
    starting = false
    if failure then
      if not stopping then stop() end
      gone:recv()
      cleanup()
      return
    end
    for _, d in ipairs(died_starting) do
      if not stopping then restart(table.unpack(d)) end
    end
    if opts.on_listen and not stopping then
      local ok, lerr = pcall(opts.on_listen, { host = host, port = port, workers = children, pid = core.getpid() })
      if not ok then
        -- as with one process, where the error ends the only one serving: the workers stop
        failure = lerr
        stop()
      end
    end
    gone:recv()
    cleanup()
  end)
  if failure then error(failure, 0) end   -- as serve without workers: "cannot listen: ...", "bad option ..."
  return true
end

return M
