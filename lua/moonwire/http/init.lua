--- moonwire.http: the HTTP/1.1 server and client.
local mw = require "moonwire"
local server = require "moonwire.http.server"

local M = {}

M.server = server.server

M.router = require("moonwire.http.router").new

-- the client
local client = require "moonwire.http.client"
M.client, M.request, M.get, M.post = client.client, client.request, client.get, client.post

--- Runs a server until SIGTERM/SIGINT (graceful shutdown), in a loop of its own when
-- called outside one. With workers = N > 1, forks N processes (see docs/http.md).
function M.serve(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'serve' (table expected)", 2) end
  local workers = opts.workers
  if workers == nil then workers = 1
  elseif math.type(workers) ~= "integer" or workers < 1 then
    error("bad option 'workers' (positive integer expected)", 2)
  end
  if workers > 1 then return require("moonwire.http.workers").serve(opts) end
  local function main()
    local srv, err = M.server(opts)
    if not srv then error("cannot listen: " .. tostring(err), 0) end
    if opts.on_listen then opts.on_listen(srv) end
    local function stop() srv:close() end
    mw.signal("SIGTERM", stop)
    mw.signal("SIGINT", stop)
    if srv.tls then
      -- certificate rotation: SIGHUP re-reads the files; open connections are not dropped
      mw.signal("SIGHUP", function()
        local ok, rerr = srv.tls:reload()
        if not ok then srv.error_log("moonwire: TLS reload failed: " .. tostring(rerr)) end
      end)
    end
    srv._accept:join()
    srv:close()
    server.close_pubsub()
    mw.signal("SIGTERM", nil)
    mw.signal("SIGINT", nil)
    if srv.tls then mw.signal("SIGHUP", nil) end
    return true
  end
  if mw.current() then return main() end
  return mw.run(main)
end

return M
