--- moonwire.socket: LuaSocket's TCP API (socket.tcp, :connect, :receive, :send, ...) on
-- moonwire's own sockets, so pure-Lua drivers written for LuaSocket run unchanged inside
-- mw.run, and every blocking call parks only the calling task. Returns, error strings and
-- timeout rules are LuaSocket 3.1's (checked against it by spec/luasocket_spec.lua); the
-- differences are listed in docs/luasocket.md. `install()` makes `require "socket"` (and
-- "ssl", see moonwire.socket.ssl) return it. It must not block the loop: no select(), no UDP.
local mw = require "moonwire"
local core = require "moonwire.core"

local M = {
  _VERSION = "LuaSocket 3.1.0 (moonwire)",
  BLOCKSIZE = 2048,
  _SETSIZE = 1024,
}

local floor, max, min = math.floor, math.max, math.min
local concat = table.concat
local hrtime = core.hrtime
local deadline_push, deadline_pop = core.deadline_push, core.deadline_pop

local function argerror(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

-- a monotonic clock in seconds (LuaSocket's gettime is the wall clock: see M.gettime)
local function now() return hrtime() / 1e9 end

-- moonwire's (message, code) -> LuaSocket's message (its socket_strerror / io_strerror)
local by_code = {
  closed = "closed", ECONNRESET = "closed", ECONNABORTED = "closed", EPIPE = "closed",
  timeout = "timeout", ETIMEDOUT = "timeout",
  ECONNREFUSED = "connection refused", EADDRINUSE = "address already in use",
  EISCONN = "already connected", EACCES = "permission denied",
}
local by_gai = {
  ["Name or service not known"] = "host or service not provided, or not known",
  ["Temporary failure in name resolution"] = "temporary failure in name resolution",
  ["Non-recoverable failure in name resolution"] = "non-recoverable failure in name resolution",
  ["no address"] = "host or service not provided, or not known",
}
local function lserr(msg, code)
  local e = by_code[code]
  if e then return e end
  if code == "dns" then
    local why = msg:match(": (.*)$") or msg
    return by_gai[why] or why
  end
  return msg
end
M.strerror = lserr

-- ---- objects ------------------------------------------------------------------------
-- One table per LuaSocket object; `kind` is "master" (not connected yet), "client" or
-- "server", as LuaSocket's classes tcp{master}, tcp{client}, tcp{server}.

local tcp = {}
local mt = { __index = tcp, __name = "tcp" }
mt.__tostring = function(self)
  if self.sslp then return ("SSL connection: %p"):format(self) end
  return ("tcp{%s}: %p"):format(self.kind, self)
end

local function new(kind, family)
  return setmetatable({
    kind = kind, family = family,
    block = -1, total = -1,        -- LuaSocket's two timeouts (settimeout modes b and t)
    rb = "", rp = 1,               -- read buffer and the position of its first unread byte
    nrecv = 0, nsent = 0, born = now(),
    opts = {}, reused = 0,
  }, mt)
end

local function wrap_client(sock, family)
  local self = new("client", family)
  sock:settimeout(-1)
  self.s = sock
  return self
end

local function check(self, fname, kinds)
  if getmetatable(self) ~= mt or not kinds[self.kind] then
    local want = next(kinds)
    argerror(1, fname, ("tcp{%s} expected, got %s"):format(want,
      getmetatable(self) == mt and "tcp{" .. self.kind .. "}" or type(self)))
  end
  return self
end
local CLIENT, SERVER, MASTER = { client = true }, { server = true }, { master = true }
local ANY = { master = true, client = true, server = true }

M.is_socket = function(v) return getmetatable(v) == mt end

-- What the next wait may last (LuaSocket's timeout_getretry): nil = no limit.
local function retry(self, start)
  local b, t = self.block, self.total
  if b < 0 and t < 0 then return nil end
  local left = t >= 0 and max(t - (now() - start), 0) or nil
  if b < 0 then return left end
  if t < 0 then return b end
  return min(b, left)
end

-- Moves more bytes into the read buffer: true, or nil, LuaSocket's error.
local function fill(self, start)
  if not self.s then return nil, "closed" end
  local data, err, code = self.s:recv(65536, retry(self, start) or -1)
  if not data then return nil, lserr(err, code) end
  self.nrecv = self.nrecv + #data
  if self.rp > #self.rb then self.rb = data
  else self.rb = self.rb:sub(self.rp) .. data end
  self.rp = 1
  return true
end

-- Takes everything unread from the buffer.
local function take_all(self)
  local s = self.rp == 1 and self.rb or self.rb:sub(self.rp)
  self.rb, self.rp = "", 1
  return s
end

-- The three readers append to `parts` and return nil on success or LuaSocket's error.
local function recv_line(self, parts, start)
  local got = {}
  while true do
    local nl = self.rb:find("\n", self.rp, true)
    if nl then
      got[#got + 1] = self.rb:sub(self.rp, nl - 1)
      self.rp = nl + 1
      parts[#parts + 1] = (concat(got):gsub("\r", ""))
      return nil
    end
    got[#got + 1] = take_all(self)
    local ok, err = fill(self, start)
    if not ok then
      parts[#parts + 1] = (concat(got):gsub("\r", ""))
      return err
    end
  end
end

local function recv_count(self, parts, n, start)
  while true do
    local avail = #self.rb - self.rp + 1
    if avail >= n then
      parts[#parts + 1] = self.rb:sub(self.rp, self.rp + n - 1)
      self.rp = self.rp + n
      return nil
    end
    n = n - avail
    parts[#parts + 1] = take_all(self)
    local ok, err = fill(self, start)
    if not ok then return err end
  end
end

local function recv_all(self, parts, start)
  local total = 0
  while true do
    local s = take_all(self)
    total = total + #s
    parts[#parts + 1] = s
    local ok, err = fill(self, start)
    if not ok then
      if err == "closed" and total > 0 then return nil end
      return err
    end
  end
end

--- sock:receive([pattern [, prefix]]) -> data | nil, err, partial
-- pattern: "*l" (default; "l" too) a line without CR and LF, "*a" ("a") until closed, or a
-- count (prefix counts towards it; 0 returns prefix or "" at once).
function tcp:receive(pattern, prefix)
  check(self, "receive", CLIENT)
  local start = now()
  if prefix ~= nil and type(prefix) ~= "string" then
    if type(prefix) ~= "number" then argerror(2, "receive", "string expected, got " .. type(prefix)) end
    prefix = tostring(prefix)
  end
  prefix = prefix or ""
  local parts = { prefix }
  local err
  local n = math.type(pattern) and pattern or (type(pattern) == "string" and tonumber(pattern))
  if n then
    if n < 0 then argerror(1, "receive", "invalid receive pattern") end
    n = floor(n)
    if n > #prefix then err = recv_count(self, parts, n - #prefix, start) end
  else
    local p = pattern or "*l"
    if type(p) ~= "string" then argerror(1, "receive", "invalid receive pattern") end
    if p:sub(1, 1) == "*" then p = p:sub(2) end
    local c = p:sub(1, 1)
    if c == "l" then err = recv_line(self, parts, start)
    elseif c == "a" then err = recv_all(self, parts, start)
    else argerror(1, "receive", "invalid receive pattern") end
  end
  if err then return nil, err, concat(parts) end
  return concat(parts), nil, nil
end

-- nested tables of strings, as OpenResty's cosocket send takes them
local function flatten(t, out)
  for _, v in ipairs(t) do
    if type(v) == "table" then flatten(v, out) else out[#out + 1] = tostring(v) end
  end
  return out
end

-- send's i and j: a number (or numeric string) truncated towards zero, as C's (long) cast
local function index(v, n, default)
  if v == nil then return default end
  local x = tonumber(v)
  if not x then argerror(n, "send", "number expected, got " .. type(v)) end
  return math.tointeger(x) or (x < 0 and math.ceil(x) or floor(x))
end

--- sock:send(data [, i [, j]]) -> last index sent | nil, err, last index sent
-- data may also be a (nested) table of strings (OpenResty's cosocket style).
function tcp:send(data, i, j)
  check(self, "send", CLIENT)
  local start = now()
  if type(data) == "table" then data = concat(flatten(data, {}))
  elseif type(data) == "number" then data = tostring(data)
  elseif type(data) ~= "string" then argerror(1, "send", "string expected, got " .. type(data)) end
  local size = #data
  i, j = index(i, 2, 1), index(j, 3, -1)
  if i < 0 then i = size + i + 1 end
  if j < 0 then j = size + j + 1 end
  if i < 1 then i = 1 end
  if j > size then j = size end
  if i > j then return (i - 1) + 0.0, nil, nil end
  if not self.s then return nil, "closed", (i - 1) + 0.0 end
  local chunk = (i == 1 and j == size) and data or data:sub(i, j)
  local ok, err, code, sent
  if self.total < 0 or not core.current() then   -- (outside a task nothing may wait anyway)
    self.s:settimeout(retry(self, start) or -1)
    ok, err, code, sent = self.s:write(chunk)
  else
    -- "t" bounds the whole call, but write's own timeout restarts whenever bytes go out:
    -- the call runs under a task deadline (mw.timeout's) instead, "b" still bounds each wait.
    -- deadline_push counts from the real clock, as now() does (not from core.now, the loop's
    -- cached clock, older by whatever this turn computed): what is left of start + total.
    self.s:settimeout(self.block)
    local prev = deadline_push(max(start + self.total - now(), 0))
    local r = table.pack(pcall(self.s.write, self.s, chunk))
    deadline_pop(prev)
    if not r[1] then error(r[2], 0) end
    ok, err, code, sent = r[2], r[3], r[4], r[5]
  end
  if not ok then
    sent = sent or 0
    self.nsent = self.nsent + sent
    return nil, lserr(err, code), (i - 1 + sent) + 0.0
  end
  self.nsent = self.nsent + #chunk
  return j + 0.0, nil, nil
end

--- sock:settimeout(seconds [, mode]): mode "b" (each wait, default) or "t" (whole call);
-- nil or negative: no limit; 0: calls that would wait return "timeout" at once.
function tcp:settimeout(t, mode)
  check(self, "settimeout", ANY)
  if t ~= nil and type(t) ~= "number" then
    t = tonumber(t) or argerror(1, "settimeout", "number expected, got " .. type(t))
  end
  t = t or -1
  mode = mode or "b"
  local m = type(mode) == "string" and mode:sub(1, 1)
  if m == "b" then self.block = t
  elseif m == "t" or m == "r" then self.total = t
  else argerror(2, "settimeout", "invalid timeout mode") end
  return 1.0
end

function tcp:gettimeout()
  check(self, "gettimeout", ANY)
  return self.block, self.total
end

--- sock:close() -> 1. The object stays: its calls then fail with "closed".
function tcp:close()
  check(self, "close", ANY)
  local s, l = self.s, self.l
  self.s, self.l = nil, nil
  if s then s:close() end
  if l then l:close() end   -- a master bound but never listen()ed: its listener
  self.rb, self.rp = "", 1
  return 1.0
end
mt.__close = function(self) self:close() end

local shut_modes = { both = "both", send = "write", receive = "read" }

function tcp:shutdown(how)
  check(self, "shutdown", CLIENT)
  local m = shut_modes[how or "both"]
  if not m then argerror(1, "shutdown", "invalid shutdown method") end
  if not self.s then return nil, "closed" end
  local ok, err, code = self.s:shutdown(m)
  if not ok then return nil, lserr(err, code) end
  if m ~= "read" then self.shut_send = self.s end   -- (setkeepalive must not pool it)
  return 1.0
end

local function family_of(host)
  return host:find(":", 1, true) and "inet6" or "inet"
end

function tcp:getpeername()
  check(self, "getpeername", CLIENT)
  if not self.s then return nil, "closed" end
  local host, port = self.s:getpeername()
  if not host then return nil, lserr(port, "") end
  return host, port, family_of(host)
end

function tcp:getsockname()
  check(self, "getsockname", ANY)
  local s = self.s or self.l   -- a bound master: its listener's address
  if not s then return nil, "closed" end
  local host, port = s:getsockname()
  if not host then return nil, lserr(port, "") end
  return host, tostring(port), family_of(host)
end

--- sock:getfamily() -> "inet4" | "inet6" (LuaSocket 3.1's names)
function tcp:getfamily()
  check(self, "getfamily", ANY)
  local s = self.s or self.l
  local host = s and s:getsockname()
  if host then return family_of(host) == "inet6" and "inet6" or "inet4" end
  return self.family == "inet6" and "inet6" or "inet4"
end

function tcp:getstats()
  check(self, "getstats", ANY)
  return self.nrecv + 0.0, self.nsent + 0.0, now() - self.born
end

function tcp:setstats(r, s, age)
  check(self, "setstats", ANY)
  self.nrecv, self.nsent = tonumber(r) or self.nrecv, tonumber(s) or self.nsent
  if age then self.born = now() - age end
  return 1.0
end

function tcp:getfd()
  check(self, "getfd", ANY)
  return self.s and self.s:fileno() or -1
end

function tcp:dirty()
  check(self, "dirty", ANY)
  return self.rp <= #self.rb
end

-- LuaSocket's option names -> moonwire's; false: known to LuaSocket, not offered here.
local options = {
  ["tcp-nodelay"] = "nodelay", keepalive = "keepalive", reuseaddr = "reuseaddr",
  reuseport = "reuseport", linger = false, ["ipv6-v6only"] = false, ["tcp-keepidle"] = false,
  ["tcp-keepcnt"] = false, ["tcp-keepintvl"] = false, ["tcp-defer-accept"] = false,
  ["tcp-fastopen"] = false, ["tcp-fastopen-connect"] = false, ["ip-multicast-loop"] = false,
  broadcast = false, dontroute = false, ["recv-buffer-size"] = "rcvbuf",
  ["send-buffer-size"] = "sndbuf",
}

--- sock:setoption(name, value) -> 1 | nil, err. Before connect/bind the value is kept and
-- applied to the socket when it exists. "linger" accepts { on = false } only.
function tcp:setoption(name, value)
  check(self, "setoption", ANY)
  local o = options[name]
  if o == nil then argerror(1, "setoption", ("unsupported option `%s'"):format(tostring(name))) end
  if name == "linger" then
    if type(value) ~= "table" then argerror(2, "setoption", "table expected") end
    if value.on then return nil, "linger is not supported by moonwire.socket" end
    return 1.0
  end
  if not o then return nil, name .. " is not supported by moonwire.socket" end
  if type(value) == "boolean" or o == "rcvbuf" or o == "sndbuf" then
    self.opts[o] = value
  else
    argerror(2, "setoption", "boolean expected, got " .. type(value))
  end
  if self.s then
    local ok, err, code = self.s:setoption(o, value)
    if not ok then return nil, lserr(err, code) end
  end
  return 1.0
end

function tcp:getoption(name)
  check(self, "getoption", ANY)
  local o = options[name]
  if o == nil then argerror(1, "getoption", ("unsupported option `%s'"):format(tostring(name))) end
  if not o then return nil, name .. " is not supported by moonwire.socket" end
  if not self.s then return self.opts[o] or false end
  local v, err, code = self.s:getoption(o)
  if v == nil then return nil, lserr(err, code) end
  return v
end

local function apply_opts(self)
  for k, v in pairs(self.opts) do
    if k ~= "reuseaddr" then self.s:setoption(k, v) end
  end
end

-- ---- connect, with OpenResty's connection pool (setkeepalive / getreusedtimes) -------------

local pools = {}   -- key -> array of { s = sock, reused = n, expires = t, tls = bool }

local function from_pool(key)
  local p = pools[key]
  while p and #p > 0 do
    local e = table.remove(p)
    if (e.expires == nil or e.expires > now()) and e.s:alive() then return e end
    e.s:close()
  end
end

-- Resolves host to an address of the object's family (tcp4/tcp6), or returns it as is.
local function pick_family(host, family)
  if not family then return host end
  local addrs, err, code = mw.resolve(host)
  if not addrs then return nil, lserr(err, code) end
  for _, a in ipairs(addrs) do
    if a.family == family then return a.host end
  end
  return nil, "host or service not provided, or not known"
end

local function literal(h) return h:match("^%d+%.%d+%.%d+%.%d+$") or h:find(":", 1, true) end

-- Where a connection to `addr` leaves from: `lhost` ("*" or nil: any; a name is resolved to
-- an address of addr's family; addr itself may be a name, resolved here) -> addr, local
-- address | nil, err.
local function local_addr(lhost, addr, family)
  if not literal(addr) then
    local addrs, err, code = mw.resolve(addr)
    if not addrs then return nil, lserr(err, code) end
    local first
    for _, a in ipairs(addrs) do
      if not family or a.family == family then first = a.host break end
    end
    if not first then return nil, "host or service not provided, or not known" end
    addr = first
  end
  local fam = family_of(addr)
  if lhost == nil or lhost == "*" then return addr, fam == "inet6" and "::" or "0.0.0.0" end
  if literal(lhost) then
    if family_of(lhost) ~= fam then return nil, "Address family for hostname not supported" end
    return addr, lhost
  end
  local addrs, err, code = mw.resolve(lhost)
  if not addrs then return nil, lserr(err, code) end
  for _, a in ipairs(addrs) do
    if a.family == fam then return addr, a.host end
  end
  return nil, "Address family for hostname not supported"
end

--- sock:connect(host, port [, opts]) -> 1 | nil, err. opts.pool names the keepalive pool
-- (default "host:port").
function tcp:connect(host, port, opts)
  check(self, "connect", MASTER)
  if type(host) ~= "string" then argerror(1, "connect", "string expected, got " .. type(host)) end
  port = tonumber(port) or argerror(2, "connect", "number expected, got " .. type(port))
  local key = opts and opts.pool or host .. ":" .. floor(port)
  local e = from_pool(key)
  if e then
    self.kind, self.s, self.reused, self.tls, self.pool = "client", e.s, e.reused + 1, e.tls, key
    return 1.0
  end
  local addr, err = pick_family(host, self.family)
  if not addr then return nil, err end
  local lhost, lport = self.bind_host, self.bind_port
  if self.l then
    -- bound (bind already listens here): LuaSocket connects from the bound address, so the
    -- listener gives it up first
    lhost, lport = self.l:getsockname()
    self.l:close()
    self.l = nil
  end
  lport = tonumber(lport) or 0
  if lhost or lport ~= 0 then
    addr, lhost = local_addr(lhost, addr, self.family)
    if not addr then return nil, lhost end
  end
  local t = retry(self, now())
  local s, msg, code = core.tcp.connect(addr, floor(port), {
    timeout = t, nodelay = self.opts.nodelay, keepalive = self.opts.keepalive,
    local_host = lhost, local_port = lport,
  })
  if not s then return nil, lserr(msg, code) end
  s:settimeout(-1)
  self.kind, self.s, self.host, self.pool = "client", s, host, key
  apply_opts(self)
  return 1.0
end

--- sock:setkeepalive([timeout_ms [, size]]) -> 1 | nil, err (OpenResty): puts the connection
-- in this process's pool for the next connect to the same host and port; the object is closed.
-- timeout_ms: idle time before it is dropped (0: never; default 60 s); size: default 30.
function tcp:setkeepalive(timeout, size)
  check(self, "setkeepalive", CLIENT)
  if timeout ~= nil then
    timeout = tonumber(timeout) or argerror(1, "setkeepalive", "number expected, got " .. type(timeout))
  end
  if size ~= nil then
    size = tonumber(size) or argerror(2, "setkeepalive", "number expected, got " .. type(size))
  end
  if not self.s then return nil, "closed" end
  -- an accepted connection has no pool: only connect() names one
  if not self.pool then return nil, "no pool (the connection was not made by connect)" end
  if self.rp <= #self.rb then return nil, "unread data in buffer" end
  -- (a connection shut for sending would give the next connect one it cannot write on)
  if self.shut_send == self.s or not self.s:alive() then
    self:close()
    return nil, "closed"
  end
  timeout = timeout or 60000
  local key = self.pool
  local p = pools[key] or {}
  pools[key] = p
  p[#p + 1] = { s = self.s, reused = self.reused, tls = self.tls,
                expires = timeout > 0 and now() + timeout / 1000 or nil }
  while #p > (size or 30) do table.remove(p, 1).s:close() end
  self.s = nil
  return 1
end

--- sock:getreusedtimes() -> how many times this connection came out of the pool.
function tcp:getreusedtimes()
  check(self, "getreusedtimes", ANY)
  return self.reused
end

--- sock:sslhandshake([reused_session [, server_name [, verify]]]) -> true | nil, err
-- (OpenResty style): TLS over the connection through moonwire's TLS. verify = true checks
-- the chain against the system CA store and server_name (or the host connected to).
function tcp:sslhandshake(reused, server_name, verify)
  check(self, "sslhandshake", CLIENT)
  if not self.s then return nil, "closed" end
  if self.tls then return true end
  if type(reused) == "table" then  -- lua-resty-* option tables
    server_name, verify = reused.server_name, reused.ssl_verify
  end
  local tls = require "moonwire.tls"
  require "moonwire.socket.ssl"   -- adds getpeercertificate, info, ... to the methods
  verify = verify and true or false
  local host = server_name or (verify and self.host) or nil
  -- a timeout leaves the handshake pending; the next call resumes it with the same context,
  -- whose verify and name were set when it started: a retry asking for others would get the
  -- first call's (true from an unverified handshake), so it is refused
  local p = self.tls_pending
  if p and (p.verify ~= verify or p.host ~= host) then
    error(("sslhandshake: the handshake that timed out was started with other options"
      .. " (verify = %s, server_name = %s)"):format(tostring(p.verify), tostring(p.host)), 2)
  end
  p = p or { ctx = tls.client_context(verify and {} or { insecure = true }), verify = verify, host = host }
  self.tls_pending = p
  local ok, err, code = self.s:starttls(p.ctx, { host = host, timeout = retry(self, now()) or -1 })
  if not ok then return nil, code == "timeout" and "timeout" or err end
  self.tls_pending = nil
  self.tls = true
  return true
end

-- ---- server side -------------------------------------------------------------------------

--- sock:bind(host, port) -> 1 | nil, err. The socket listens from here on (moonwire binds and
-- listens in one step); listen() only makes it a server object.
function tcp:bind(host, port)
  check(self, "bind", MASTER)
  if self.l then return nil, "Invalid argument" end   -- bound already (LuaSocket: EINVAL)
  if type(host) ~= "string" then argerror(1, "bind", "string expected, got " .. type(host)) end
  port = tonumber(port) or argerror(2, "bind", "number expected, got " .. type(port))
  if host == "*" then host = self.family == "inet6" and "::" or "0.0.0.0" end
  local l, err, code = core.tcp.listen { host = host, port = floor(port), backlog = 32,
    reuseaddr = self.opts.reuseaddr or false, reuseport = self.opts.reuseport or false }
  if not l then return nil, lserr(err, code) end
  self.l = l
  return 1.0
end

function tcp:listen(backlog)
  check(self, "listen", MASTER)
  if backlog ~= nil and not tonumber(backlog) then argerror(1, "listen", "number expected") end
  if not self.l then return nil, "not bound (call bind first)" end
  self.kind, self.s, self.l = "server", self.l, nil
  return 1.0
end

--- server:accept() -> client | nil, err
function tcp:accept()
  check(self, "accept", SERVER)
  if not self.s then return nil, "closed" end
  local s, err, code = self.s:accept(retry(self, now()) or -1)
  if not s then return nil, lserr(err, code) end
  local host = s:getsockname()
  return wrap_client(s, family_of(host))
end

-- ---- module functions ---------------------------------------------------------------------

function M.tcp() return new("master", nil) end
function M.tcp4() return new("master", "inet") end
function M.tcp6() return new("master", "inet6") end
M.tcp_mt = mt
M._retry = retry   -- for moonwire.socket.ssl
M._now = now

-- (LuaSocket's inet_optfamily: "unspec", "inet", "inet6"; anything else raises)
local families = { unspec = false, inet = "inet", inet6 = "inet6" }

function M.connect(host, port, lhost, lport, family)
  if family ~= nil then
    local f = families[family]
    if f == nil then argerror(5, "connect", "invalid option '" .. tostring(family) .. "'") end
    family = f or nil
  end
  local s = new("master", family)
  if lhost ~= nil then
    if type(lhost) ~= "string" then argerror(3, "connect", "string expected, got " .. type(lhost)) end
    s.bind_host, s.bind_port = lhost, tonumber(lport) or 0
  end
  local ok, err = s:connect(host, port)
  if not ok then return nil, err end
  return s
end
function M.connect4(host, port, lhost, lport) return M.connect(host, port, lhost, lport, "inet") end
function M.connect6(host, port, lhost, lport) return M.connect(host, port, lhost, lport, "inet6") end

function M.bind(host, port, backlog)
  local s = new("master", nil)
  s:setoption("reuseaddr", true)
  local ok, err = s:bind(host, port)
  if not ok then return nil, err end
  s:listen(backlog)
  return s
end

function M.udp() return nil, "udp is not supported by moonwire.socket" end
M.udp4, M.udp6 = M.udp, M.udp

-- LuaSocket's gettime is the wall clock with fractions; here: the wall clock at load time
-- (whole seconds) advanced by the monotonic clock, so differences are exact.
local epoch0, mono0 = os.time(), now()
function M.gettime() return epoch0 + (now() - mono0) end

--- socket.sleep(s): parks the calling task (never the loop).
function M.sleep(s)
  s = tonumber(s) or argerror(1, "sleep", "number expected, got " .. type(s))
  if s > 0 then mw.sleep(s) end
end

--- socket.select: only its sleeping form (no sockets) is offered; wait on sockets with tasks.
function M.select(r, w, t)
  if (r and next(r)) or (w and next(w)) then
    error("socket.select on sockets is not supported by moonwire.socket (use tasks)", 2)
  end
  if t and t > 0 then mw.sleep(t) end
  return {}, {}, "timeout"
end

-- ---- dns ----------------------------------------------------------------------------------

local function literal4(h) return h:match("^%d+%.%d+%.%d+%.%d+$") end

local dns = {}
M.dns = dns

--- socket.dns.toip(name) -> first IPv4 address, { name, alias = {}, ip = { ... } } | nil, err
-- (resolver thread pool: parks the task). No reverse lookups: `name` is the name asked for.
function dns.toip(name)
  if type(name) ~= "string" then argerror(1, "toip", "string expected, got " .. type(name)) end
  if literal4(name) then return name, { name = name, alias = {}, ip = { name } } end
  local addrs = mw.resolve(name)
  local ips, seen = {}, {}
  for _, a in ipairs(addrs or {}) do
    if a.family == "inet" and not seen[a.host] then
      seen[a.host] = true
      ips[#ips + 1] = a.host
    end
  end
  if #ips == 0 then return nil, "host not found" end
  return ips[1], { name = name, alias = {}, ip = ips }
end

function dns.getaddrinfo(name)
  if type(name) ~= "string" then argerror(1, "getaddrinfo", "string expected, got " .. type(name)) end
  local addrs, err, code = mw.resolve(name)
  if not addrs then return nil, lserr(err, code) end
  local out, seen = {}, {}
  for _, a in ipairs(addrs) do
    if not seen[a.host] then
      seen[a.host] = true
      out[#out + 1] = { family = a.family, addr = a.host }
    end
  end
  return out
end

function dns.tohostname() return nil, "reverse lookups are not supported by moonwire.socket" end
dns.getnameinfo = dns.tohostname

function dns.gethostname()
  local f = io.open("/proc/sys/kernel/hostname")
  local name = f and f:read("l")
  if f then f:close() end
  return name or "localhost"
end

-- ---- LuaSocket's error helpers, sources and sinks (socket.lua's part of the API) -----------

local try_mt = { __tostring = function(e) return tostring(e[1]) end }

function M.newtry(finalizer)
  return function(...)
    if not (...) then
      if finalizer then pcall(finalizer) end
      error(setmetatable({ (select(2, ...)) }, try_mt), 0)
    end
    return ...
  end
end
M.try = M.newtry()

local function protected(ok, ...)
  if ok then return ... end
  local e = ...
  if getmetatable(e) == try_mt then return nil, e[1] end
  error(e, 0)
end

function M.protect(f)
  return function(...) return protected(pcall(f, ...)) end
end

function M.skip(n, ...) return select(n + 1, ...) end

function M.choose(t)
  return function(name, a, b)
    if type(name) ~= "string" then name, a, b = "default", name, a end
    local f = t[name or "nil"]
    if not f then error("unknown key (" .. tostring(name) .. ")", 3) end
    return f(a, b)
  end
end

local function endpoint(sock, call)
  return setmetatable({
    getfd = function() return sock:getfd() end,
    dirty = function() return sock:dirty() end,
  }, { __call = call })
end

M.sinkt = {
  ["close-when-done"] = function(sock)
    return endpoint(sock, function(_, chunk)
      if chunk then return sock:send(chunk) end
      sock:close()
      return 1
    end)
  end,
  ["keep-open"] = function(sock)
    return endpoint(sock, function(_, chunk)
      if chunk then return sock:send(chunk) end
      return 1
    end)
  end,
}
M.sinkt.default = M.sinkt["keep-open"]
M.sink = M.choose(M.sinkt)

M.sourcet = {
  ["by-length"] = function(sock, length)
    return endpoint(sock, function()
      if length <= 0 then return nil end
      local chunk, err = sock:receive(min(M.BLOCKSIZE, length))
      if err then return nil, err end
      length = length - #chunk
      return chunk
    end)
  end,
  ["until-closed"] = function(sock)
    local done = false
    return endpoint(sock, function()
      if done then return nil end
      local chunk, err, partial = sock:receive(M.BLOCKSIZE)
      if not err then return chunk end
      if err ~= "closed" then return nil, err end
      sock:close()
      done = true
      return partial
    end)
  end,
}
M.sourcet.default = M.sourcet["until-closed"]
M.source = M.choose(M.sourcet)

-- ---- making `require "socket"` return this module ---------------------------------------

-- LuaSocket's pure-Lua modules keep the `socket` they were loaded with: they are reloaded
-- against the shim (and their previous copies restored on uninstall).
local dependents = { "socket.http", "socket.tp", "socket.smtp", "socket.ftp", "ssl.https" }

--- install([opts]) -> uninstall(): package.loaded.socket and ["socket.core"] become this
-- module, package.loaded.ssl moonwire.socket.ssl (opts.ssl = false leaves it). Process-wide
-- until uninstall() is called.
function M.install(opts)
  local names = { "socket", "socket.core" }
  if not (opts and opts.ssl == false) then names[#names + 1] = "ssl" end
  local saved = {}
  for _, n in ipairs(names) do saved[n] = package.loaded[n] or false end
  for _, n in ipairs(dependents) do
    saved[n] = package.loaded[n] or false
    package.loaded[n] = nil
  end
  package.loaded.socket, package.loaded["socket.core"] = M, M
  if saved.ssl ~= nil then package.loaded.ssl = require "moonwire.socket.ssl" end
  local done = false
  return function()
    if done then return end
    done = true
    for n, v in pairs(saved) do package.loaded[n] = v or nil end
  end
end

--- with(fn, ...) -> fn's results: fn runs with the shim installed, then it is uninstalled
-- (also when fn raises). Drivers that `require "socket"` while loading must be required inside.
function M.with(fn, ...)
  local uninstall = M.install()
  local r = table.pack(pcall(fn, ...))
  uninstall()
  if not r[1] then error(r[2], 0) end
  return table.unpack(r, 2, r.n)
end

return M
