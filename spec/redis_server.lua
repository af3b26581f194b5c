-- spec/redis_server.lua: starts a throw-away redis-server for a spec file and stops it.
-- Each server lives in its own temporary directory: a Unix socket there, a TCP port on
-- 127.0.0.1 (picked by binding port 0 and releasing it; if another process takes it first,
-- the start is retried on a new port), optionally a TLS port. No persistence (--save "",
-- --appendonly no). `stop()` kills it and removes the directory; call it from teardown.
local mw = require "moonwire"

local M = {}

local function sh(cmd)
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function free_port()
  local l = assert(mw.tcp.listen { host = "127.0.0.1", port = 0 })
  local _, port = l:getsockname()
  l:close()
  return port
end

local function readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function alive(pid)
  return pid and sh("kill -0 " .. pid .. " 2>/dev/null")
end

-- Waits (polling, at most `limit` s) until redis-cli answers PONG on the Unix socket, or the
-- server is gone. Returns true when it answers.
local function wait_ready(srv, limit)
  for _ = 1, limit * 20 do
    local pid = tonumber(readfile(srv.dir .. "/redis.pid") or "")
    if pid then srv.pid = pid end
    if srv.pid and not alive(srv.pid) then return false end
    local p = io.popen("redis-cli -s " .. q(srv.path) .. " ping 2>/dev/null")
    local out = p:read("a")
    p:close()
    if out:find("PONG") then
      -- the pid file may come a moment after the socket answers; ask the server itself
      p = io.popen("redis-cli -s " .. q(srv.path) .. " info server 2>/dev/null")
      srv.pid = tonumber(p:read("a"):match("process_id:(%d+)"))
      p:close()
      return srv.pid ~= nil
    end
    sh("sleep 0.05")
  end
  return false
end

--- M.start{ tls = certdir (files of spec/fixtures/make-certs), args = { "--opt", "v", ... } }
-- -> server { port, path, tls_port, dir, pid, url, stop = function } (raises on failure)
function M.start(opts)
  opts = opts or {}
  local p = io.popen("mktemp -d /tmp/mw-redis.XXXXXX")
  local dir = p:read("l")
  p:close()
  local srv = { dir = dir, path = dir .. "/redis.sock" }
  for _ = 1, 10 do
    srv.port = free_port()
    local args = {
      "redis-server", "--daemonize", "yes", "--dir", q(dir), "--pidfile", q(dir .. "/redis.pid"),
      "--logfile", q(dir .. "/redis.log"), "--save", "''", "--appendonly", "no",
      "--bind", "127.0.0.1", "--port", srv.port, "--unixsocket", q(srv.path),
      "--unixsocketperm", "700", "--enable-debug-command", "yes",
    }
    if opts.tls then
      srv.tls_port = free_port()
      for _, a in ipairs { "--tls-port", srv.tls_port, "--tls-cert-file", q(opts.tls .. "/server-chain.pem"),
        "--tls-key-file", q(opts.tls .. "/server.key"), "--tls-ca-cert-file", q(opts.tls .. "/ca.pem"),
        "--tls-auth-clients", "no" } do
        args[#args + 1] = a
      end
    end
    for _, a in ipairs(opts.args or {}) do args[#args + 1] = q(a) end
    os.remove(dir .. "/redis.pid")
    local cmd = table.concat(args, " ") .. " >/dev/null 2>&1"
    if sh(cmd) and wait_ready(srv, 5) then
      srv.url = "redis://127.0.0.1:" .. srv.port
      function srv.stop()
        if srv.pid and alive(srv.pid) then
          sh("kill -9 " .. srv.pid)
          for _ = 1, 100 do
            if not alive(srv.pid) then break end
            sh("sleep 0.02")
          end
        end
        sh("rm -rf " .. q(dir))
      end
      function srv.kill()
        if srv.pid then sh("kill -9 " .. srv.pid) end
      end
      function srv.log() return readfile(dir .. "/redis.log") end
      -- starts it again on the same port and directory (it loads dump.rdb if one was SAVEd)
      function srv.restart()
        srv.kill()
        for _ = 1, 100 do
          if not alive(srv.pid) then break end
          sh("sleep 0.02")
        end
        os.remove(dir .. "/redis.pid")
        srv.pid = nil
        assert(sh(cmd) and wait_ready(srv, 5), "redis-server did not restart")
      end
      return srv
    end
    if srv.pid and alive(srv.pid) then sh("kill -9 " .. srv.pid) end
    local log = readfile(dir .. "/redis.log") or ""
    if not log:find("ddress already in use") then
      sh("rm -rf " .. q(dir))
      error("redis-server did not start:\n" .. log)
    end
  end
  sh("rm -rf " .. q(dir))
  error("redis-server did not start (no free port after 10 tries)")
end

return M
