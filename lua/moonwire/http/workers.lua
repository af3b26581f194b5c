--- Multi-process serving: N forked workers share the port through SO_REUSEPORT (the kernel
-- spreads connections over their listeners); the parent supervises them: a worker that dies
-- is restarted, SIGTERM/SIGINT stop them all gracefully.
local mw = require "moonwire"
local core = require "moonwire.core"
local server = require "moonwire.http.server"
local bus = require "moonwire.pubsub.bus"

local M = {}

local RESTART_DELAY = 0.1   -- a worker that keeps dying is not restarted in a hot loop

local function worker_main(opts, ready)
  local srv, err = server.server(opts)
  if not srv then error("worker cannot listen: " .. tostring(err), 0) end
  ready:write("1")                 -- the parent's on_listen waits for every worker's listener
  ready:close()
  local function stop() srv:close() end
  mw.signal("SIGTERM", stop)
  mw.signal("SIGINT", stop)
  if srv.tls then mw.signal("SIGHUP", function() srv.tls:reload() end) end
  srv._accept:join()
  srv:close()
  server.close_pubsub()
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
  -- reserve the port (bound, not listening: it takes no connections) so port = 0 works
  local reserve, err = mw.tcp.listen{ host = opts.host or "127.0.0.1", port = opts.port or 8080,
    reuseport = true, listen = false }
  if not reserve then error("cannot listen: " .. tostring(err), 2) end
  local host, port = reserve:getsockname()
  local wopts = copy(opts)
  wopts.host, wopts.port, wopts.reuseport, wopts.workers = host, port, true, nil

  return mw.run(function()
    local children, count = {}, 0
    local stopping = false
    local all_gone = mw.channel(1)
    if opts.bus ~= false then bus.hub_start() end   -- moonwire.pubsub between the workers

    -- Forks the worker of `slot`; returns the parent's end of a pair on which the worker
    -- writes one byte once it listens (EOF if it never does).
    local function start_worker(slot)
      local ready, ready_w = core.unix.pair()
      local pid, ferr = core.fork()
      if not pid then
        io.stderr:write("moonwire: fork failed: ", tostring(ferr), "\n")
        ready:close()
        ready_w:close()
        return nil
      end
      if pid == 0 then                           -- the worker: never returns to this code
        reserve:close()
        ready:close()
        bus.forked()
        mw.signal("SIGCHLD", nil)
        local ok, werr = pcall(worker_main, wopts, ready_w)
        if not ok then io.stderr:write("moonwire: worker: ", tostring(werr), "\n") end
        io.stdout:flush()
        os.exit(ok and 0 or 1, false)
      end
      ready_w:close()
      children[pid] = slot
      count = count + 1
      return ready
    end

    mw.signal("SIGCHLD", function()
      while true do
        local pid, how, code = core.waitpid(-1)
        if not pid or pid == 0 then break end
        local slot = children[pid]
        if slot then
          children[pid] = nil
          count = count - 1
          if not stopping then
            io.stderr:write(("moonwire: worker %d exited (%s %d), restarting\n"):format(pid, how, code))
            mw.sleep(RESTART_DELAY)
            if not stopping then
              local ready = start_worker(slot)
              if ready then ready:close() end
            end
          end
        end
      end
      if stopping and count == 0 then all_gone:send(true, 0) end
    end)

    local function stop()
      if stopping then return end
      stopping = true
      for pid in pairs(children) do core.kill(pid, "SIGTERM") end
      if count == 0 then all_gone:send(true, 0) end
    end
    mw.signal("SIGTERM", stop)
    mw.signal("SIGINT", stop)

    -- on_listen once every worker listens (a client told the port at once is not refused)
    local readies = {}
    for i = 1, n do readies[#readies + 1] = start_worker(i) end
    for _, ready in ipairs(readies) do
      ready:read(1, 30)                          -- "1", or nil when that worker failed
      ready:close()
    end
    if opts.on_listen then
      opts.on_listen{ host = host, port = port, workers = children, pid = core.getpid() }
    end
    all_gone:recv()
    for _, s in ipairs{ "SIGTERM", "SIGINT", "SIGCHLD" } do mw.signal(s, nil) end
    reserve:close()
    bus.hub_stop()
    return true
  end)
end

return M
