--- TLS contexts and TLS connections (OpenSSL, in the core's stream layer).
-- mw.tls.context{...} builds a context; mw.tcp.connect/listen accept `tls = {...}` (or a
-- context) and sock:starttls(ctx, { host = ... }) upgrades a plain connection.
local core = require "moonwire.core"

local M = {}

local client_keys = { "cafile", "capath", "cert", "key", "insecure", "min_version", "ciphers", "ciphersuites" }

local function argerror(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

-- Every key a `tls` table may hold (the context's, and a connection's host and timeout): a
-- misspelt one raises instead of being ignored (`verify_clinet = "require"` served without
-- client certificates, `cafiel = ...` verified against the system's CAs).
local KNOWN = { server = true, cert = true, key = true, sni = true, alpn = true, min_version = true,
  ciphers = true, ciphersuites = true, cafile = true, capath = true, insecure = true, verify_client = true,
  host = true, timeout = true }
local function check_keys(opt, level)
  for k in pairs(opt) do
    if not KNOWN[k] then error(("unknown option 'tls.%s'"):format(tostring(k)), level + 1) end
  end
end

--- mw.tls.context{ server = bool, cert, key, sni, alpn, min_version, ciphers, ciphersuites,
-- cafile, capath, insecure, verify_client } -> context (raises on bad options or files)
function M.context(opts)
  if type(opts) ~= "table" then argerror(1, "context", "table expected, got " .. type(opts)) end
  check_keys(opts, 2)
  return core.tls_context(opts)
end

function M.is_context(v)
  return type(v) == "userdata" and getmetatable(v) == debug.getregistry()["moonwire.TlsContext"]
end

-- Client contexts are costly to build (the CA store is read): one per distinct setting.
local client_cache = setmetatable({}, { __mode = "v" })

--- The client context for a `tls` option value (true, a table of client options, or a
-- context); also returns the host to verify when the table names one.
function M.client_context(opt)
  if M.is_context(opt) then
    -- (a client's connect given a server context would wait for a ClientHello the server
    -- never sends: the handshake would hang, or time out)
    if opt:is_server() then error("bad option 'tls' (a client context expected, got a server context)", 3) end
    return opt
  end
  if opt == true then opt = {} end
  if type(opt) ~= "table" then error("bad option 'tls' (true, table or context expected)", 3) end
  check_keys(opt, 2)
  local host = opt.host
  if host ~= nil and (type(host) ~= "string" or host == "" and opt.insecure ~= true) then
    -- an empty name would verify the chain alone: any certificate of the CA would do
    error("bad option 'tls.host' (a non-empty host name expected, or insecure = true)", 3)
  end
  local parts = {}
  for _, k in ipairs(client_keys) do parts[#parts + 1] = tostring(opt[k]) end
  if opt.alpn then
    if type(opt.alpn) ~= "table" then error("bad option 'alpn' (list of protocol names expected)", 3) end
    parts[#parts + 1] = table.concat(opt.alpn, ",")
  end
  local key = table.concat(parts, "\0")
  local ctx = client_cache[key]
  if not ctx then
    local o = {}
    for k, v in pairs(opt) do if k ~= "host" and k ~= "timeout" then o[k] = v end end
    o.server = false
    ctx = core.tls_context(o)
    client_cache[key] = ctx
  end
  return ctx
end

--- The server context for a `tls` option value (a table of server options or a context).
function M.server_context(opt)
  if M.is_context(opt) then return opt end
  if type(opt) ~= "table" then error("bad option 'tls' (table or context expected)", 3) end
  check_keys(opt, 2)
  local o = {}
  for k, v in pairs(opt) do o[k] = v end
  o.server = true
  return core.tls_context(o)
end

--- Connects and handshakes: mw.tcp.connect(host, port, { tls = ..., timeout = ... }).
function M.connect(tcp_connect, host, port, opts)
  local t = opts.tls
  local ctx = M.client_context(t)
  local sock, err, code = tcp_connect(host, port, opts)
  if not sock then return nil, err, code end
  -- (a bracketed IPv6 literal, as tcp.connect takes it, is verified as the address it is)
  local verify_host = type(t) == "table" and t.host or (host:match("^%[(.*)%]$") or host)
  local ok
  ok, err, code = sock:starttls(ctx, { host = verify_host, timeout = opts.timeout })
  if not ok then
    sock:close()
    return nil, err, code
  end
  return sock
end

return M
