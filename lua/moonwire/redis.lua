--- moonwire.redis: a Redis client (RESP2 and RESP3) over moonwire's sockets.
-- Many tasks may share one connection: each call writes its command into the socket's
-- output buffer (all the commands of a loop turn leave in one write) and waits for its own
-- reply; replies come back in order (the C core, src/redis.c, matches them, FIFO).
--
-- Results: the reply as a Lua value; `nil, message, "redis"` for an error reply;
-- `nil, message, code` for a failure (I/O, timeout, closed, protocol); `redis.null` for a
-- nil reply. Inside aggregates an error reply is an error object (`redis.is_error(v)`,
-- `v.message`). See docs/redis.md.
local core = require "moonwire.core"
local mw = require "moonwire"
local urlmod = require "moonwire.url"
local seconds = require("moonwire.opts").seconds

local rc_methods = core.resp_methods
local rc_call, rc_batch = rc_methods.call, rc_methods.batch
local ERRMT = core.resp_error_mt
local park, unpark, current = core.park, core.unpark, core.current
local pack, unpack, select, type = table.pack, table.unpack, select, type

local M = { null = core.resp_null, encode = core.resp_encode, decoder = core.resp_decoder }

--- Whether v is an error reply found inside an aggregate (pipeline, transaction results).
function M.is_error(v)
  return type(v) == "table" and getmetatable(v) == ERRMT
end

local function argerror(n, fname, msg, level)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), (level or 2) + 1)
end

-- ---- options -----------------------------------------------------------------------------

-- The URL s as an error message shows it: without a password (errors end up in logs); a
-- userinfo without ":" is one too here (redis://secret@host).
local function shown(s)
  return (urlmod.redact(s):gsub("^(%a[%w+.-]*://)[^/?#:@]+@", "%1***@"))
end

-- true, or nil and a message naming the URL s when db or resp is not a number it can be
-- (ignoring it would write to db 0, or speak RESP2)
local function parse_query(q, o, s)
  if not q then return true end
  for k, v in pairs(urlmod.parse_query(q)) do
    if type(v) == "table" then v = v[#v] end
    if k == "db" then
      o.db = v:match("^%d+$") and math.tointeger(tonumber(v))
      if not o.db then return nil, "invalid database in Redis URL: " .. shown(s) end
    elseif k == "password" then o.password = v
    elseif k == "user" or k == "username" then o.user = v
    elseif k == "resp" or k == "protocol" then
      if v ~= "2" and v ~= "3" then return nil, "invalid protocol (2 or 3) in Redis URL: " .. shown(s) end
      o.resp = tonumber(v)
    end
  end
  return true
end

-- redis://[user:pass@]host[:port][/db], rediss://..., unix:///path[?db=N&password=...]
local function parse_url(s)
  local o = {}
  local path = s:match("^unix://(/[^?#]*)")
  if path then
    o.path = urlmod.decode(path)
    local ok, err = parse_query(s:match("%?([^#]*)"), o, s)
    if not ok then return nil, err end
    return o
  end
  local scheme = s:match("^(%a[%w+.-]*)://")
  scheme = scheme and scheme:lower()
  if scheme ~= "redis" and scheme ~= "rediss" then
    return nil, "invalid Redis URL (redis://, rediss:// or unix:// expected): " .. shown(s)
  end
  local u, err = urlmod.parse(s)
  if not u then
    local r = urlmod.redact(s)                 -- (url.parse's message ends with that)
    if err:sub(-#r) == r then err = err:sub(1, #err - #r) .. shown(s) end
    return nil, err
  end
  o.host, o.port = u.host, u.port or 6379
  o.user = u.user ~= "" and u.user or nil
  o.password = u.password
  if u.user and not u.password then o.password, o.user = u.user, nil end  -- redis://secret@host
  local db = u.path:match("^/(%d+)$")
  if db then o.db = math.tointeger(tonumber(db)) end
  if (db and not o.db) or (not db and u.path ~= "/") then return nil, "invalid database in Redis URL: " .. shown(s) end
  if scheme == "rediss" then o.tls = true end
  local ok, qerr = parse_query(u.query, o, s)
  if not ok then return nil, qerr end
  return o
end

-- The connection settings from a URL string and/or an options table.
local function settings(target, opts, fname)
  local o
  if type(target) == "string" then
    local err
    o, err = parse_url(target)
    if not o then argerror(1, fname, err, 3) end
  elseif type(target) == "table" then
    o = {}
    if target.url then
      local err
      o, err = parse_url(target.url)
      if not o then argerror(1, fname, err, 3) end
    end
    -- the table's own fields, then a second table's over them (it was ignored)
    for k, v in pairs(target) do
      if k ~= "url" then o[k] = v end
    end
  else
    argerror(1, fname, "URL or table expected, got " .. type(target), 3)
  end
  if opts ~= nil and type(opts) ~= "table" then argerror(2, fname, "table expected, got " .. type(opts), 3) end
  for k, v in pairs(opts or {}) do
    if k ~= "url" then o[k] = v end
  end
  if o.username and not o.user then o.user = o.username end
  if not o.path then
    o.host = o.host or "127.0.0.1"
    o.port = o.port or 6379
  end
  if o.cafile then
    if o.tls == nil or o.tls == true then o.tls = {} end
    if type(o.tls) == "table" and not o.tls.cafile then
      local t = {}
      for k, v in pairs(o.tls) do t[k] = v end
      t.cafile = o.cafile
      o.tls = t
    end
  end
  if o.resp ~= nil and o.resp ~= 2 and o.resp ~= 3 then
    error(("bad option 'resp' (2 or 3 expected, got %s)"):format(tostring(o.resp)), 3)
  end
  -- (a db handshake() would skip, "x" or -1, would leave the connection on db 0; digits in a
  -- string, as an environment variable gives them, are a number)
  if type(o.db) == "string" and o.db:match("^%d+$") then o.db = math.tointeger(tonumber(o.db)) or o.db end
  if o.db ~= nil and (math.type(o.db) ~= "integer" or o.db < 0) then
    error(("bad option 'db' (non-negative integer expected, got %s)"):format(tostring(o.db)), 3)
  end
  -- the others too, before anything connects: a bad one raised from the handshake naming a
  -- command ('AUTH', 'CLIENT') or from the C layer once connected (leaving the socket open),
  -- and redis.subscriber (so pubsub) retried it forever in its task instead of raising
  local function bad(k, expected, v)
    local numeric = type(v) == "number" and (expected:find("number") or expected:find("integer"))
    error(("bad option '%s' (%s expected, got %s)"):format(k, expected, numeric and tostring(v) or type(v)), 4)
  end
  if not o.path then
    if type(o.host) ~= "string" then bad("host", "string", o.host) end
    local port = math.tointeger(tonumber(o.port))
    if type(o.port) ~= "number" and type(o.port) ~= "string" or not port or port < 1 or port > 65535 then
      bad("port", "port number", o.port)
    end
  elseif type(o.path) ~= "string" then
    bad("path", "string", o.path)
  end
  for _, k in ipairs { "user", "password", "name" } do
    local v = o[k]
    if v ~= nil and type(v) ~= "string" and type(v) ~= "number" then bad(k, "string", v) end
  end
  for _, k in ipairs { "timeout", "connect_timeout" } do
    -- (numbers or numeric strings, as every timeout: docs/api.md)
    if o[k] ~= nil and not seconds(o[k]) then bad(k, "number", o[k]) end
  end
  for _, k in ipairs { "max_bulk", "max_pushes" } do
    local v = o[k]
    if v ~= nil and (math.type(v) ~= "integer" or v < 1) then bad(k, "positive integer", v) end
  end
  if o.max_depth ~= nil and (math.type(o.max_depth) ~= "integer" or o.max_depth < 1 or o.max_depth > 128) then
    bad("max_depth", "integer 1..128", o.max_depth)
  end
  return o
end

-- ---- the connection ----------------------------------------------------------------------

local Redis = {}
local Conn = { __index = Redis, __name = "moonwire.Redis" }

-- Any other name is a command: r:get(k) sends GET k. The method is made once per name.
setmetatable(Redis, { __index = function(t, name)
  if type(name) ~= "string" or name:sub(1, 1) == "_" then return nil end
  local f = function(self, ...) return rc_call(self._rc, name, ...) end
  rawset(t, name, f)
  return f
end })

local function handshake(rc, o)
  local v, err, code
  if o.resp == 3 then
    local args = { "HELLO", "3" }
    if o.password then
      args[#args + 1] = "AUTH"
      args[#args + 1] = o.user or "default"
      args[#args + 1] = o.password
    end
    if o.name then
      args[#args + 1] = "SETNAME"
      args[#args + 1] = o.name
    end
    v, err, code = rc_call(rc, unpack(args))
    if v == nil then return nil, err, code end
  else
    if o.password then
      if o.user then v, err, code = rc_call(rc, "AUTH", o.user, o.password)
      else v, err, code = rc_call(rc, "AUTH", o.password) end
      if v == nil then return nil, err, code end
    end
    if o.name then
      v, err, code = rc_call(rc, "CLIENT", "SETNAME", o.name)
      if v == nil then return nil, err, code end
    end
  end
  local hello = v
  if o.db and o.db ~= 0 then
    v, err, code = rc_call(rc, "SELECT", o.db)
    if v == nil then return nil, err, code end
  end
  return true, hello
end

--- redis.connect(url_or_opts [, opts]) -> connection | nil, err, code
-- opts: host, port, path (Unix socket), tls (true | table | context), cafile, user,
-- password, db, resp (2 or 3), name, timeout (per call, s), connect_timeout (s, default 10),
-- pushes (queue RESP3 pushes for push_recv), max_bulk, max_depth.
function M.connect(target, opts)
  local o = settings(target, opts, "connect")
  local ct = o.connect_timeout or o.timeout or 10
  local sock, err, code
  if o.path then
    sock, err, code = mw.unix.connect(o.path, { timeout = ct })
    if sock and o.tls then
      local ctx = require("moonwire.tls").client_context(o.tls)
      local host = type(o.tls) == "table" and o.tls.host or "localhost"
      local ok
      ok, err, code = sock:starttls(ctx, { host = host, timeout = ct })
      if not ok then
        sock:close()
        sock = nil
      end
    end
  else
    sock, err, code = mw.tcp.connect(o.host, o.port, { timeout = ct, tls = o.tls })
  end
  if not sock then return nil, err, code end
  local rc = core.resp_conn(sock, { timeout = ct, pushes = o.pushes, max_pushes = o.max_pushes,
    max_bulk = o.max_bulk, max_depth = o.max_depth })
  local ok, hello, hcode = handshake(rc, o)
  if not ok then
    rc:close()
    return nil, hello, hcode
  end
  rc:settimeout(o.timeout or -1)
  -- (false, not nil, under RESP2: a missing field would be the HELLO command's method)
  return setmetatable({ _rc = rc, _opts = o, hello = o.resp == 3 and hello or false }, Conn)
end

--- r:call(cmd, ...) -> reply | nil, message, "redis" | nil, err, code
function Redis:call(...)
  return rc_call(self._rc, ...)
end

--- r:close(): in-flight calls get nil, "closed", "closed".
function Redis:close()
  self._rc:close()
end
Conn.__close = Redis.close

--- r:alive() -> false once the connection failed or was closed
function Redis:alive() return self._rc:alive() end

--- r:settimeout(s): the default timeout of each call from now on (nil: none).
function Redis:settimeout(s)
  if s ~= nil and type(s) ~= "number" then argerror(1, "settimeout", "number expected, got " .. type(s)) end
  self._rc:settimeout(s)
end

--- r:pending() -> replies owed, pushes queued, pushes dropped
function Redis:pending() return self._rc:pending() end

--- r:send(cmd, ...) -> true | nil, err, code: writes a command without waiting for a reply
-- (for RESP3 commands answered by pushes: SUBSCRIBE, UNSUBSCRIBE, ...; read them with push_recv).
function Redis:send(...) return self._rc:send(...) end

--- r:push_recv([timeout]) -> the next RESP3 push (a table) | nil, err, code (needs `pushes`)
function Redis:push_recv(timeout) return self._rc:push_recv(timeout) end

-- A pipeline's recorder: p:get(k), p:call(cmd, ...) queue the command.
local Recorder = {}
local Rec = { __index = Recorder }

-- Refused in a batch: these commands answer with a confirmation per name (RESP3: pushes,
-- which a batch does not count), and an UNSUBSCRIBE of everything with as many as there
-- are subscriptions, where a batch counts one reply per command. Inside MULTI/EXEC Redis
-- queues them but then counts one element of EXEC's array per command and sends one per
-- name, breaking the protocol (redis/redis#12207); subscribed under RESP2 it refuses MULTI.
local SUBSCRIBE_FAMILY = { subscribe = true, psubscribe = true, ssubscribe = true,
  unsubscribe = true, punsubscribe = true, sunsubscribe = true }
local BATCHED = { pipeline = "pipelined", transaction = "in a transaction" }

local function record(self, name, ...)
  if SUBSCRIBE_FAMILY[name:lower()] then
    argerror(1, self._fname, ("%s cannot be %s: use r:call"):format(name:upper(), BATCHED[self._fname]), 3)
  end
  local n = select("#", ...)
  local cmd = { name, ... }
  for i = 1, n do
    local t = type(cmd[i + 1])
    if t ~= "string" and t ~= "number" then
      argerror(i, name, "string or number expected, got " .. t, 3)
    end
  end
  self._cmds[#self._cmds + 1] = cmd
end
function Recorder:call(name, ...)
  if type(name) ~= "string" then argerror(1, "call", "command name expected, got " .. type(name)) end
  record(self, name, ...)
end
setmetatable(Recorder, { __index = function(t, name)
  if type(name) ~= "string" or name:sub(1, 1) == "_" then return nil end
  local f = function(self, ...) record(self, name, ...) end
  rawset(t, name, f)
  return f
end })

local function recorded(fn, fname, first)
  if type(fn) ~= "function" then argerror(1, fname, "function expected, got " .. type(fn), 3) end
  local p = setmetatable({ _cmds = first and { first } or {}, _fname = fname }, Rec)
  fn(p)
  return p._cmds
end

--- r:pipeline(fn) -> { reply, ... } | nil, err, code. fn(p) queues commands on p (p:set(k, v),
-- p:call(...)); they are written at once, and the replies come back in a table, in order
-- (error replies as error objects, nil replies as redis.null).
function Redis:pipeline(fn)
  local cmds = recorded(fn, "pipeline")
  if #cmds == 0 then return {} end
  return rc_batch(self._rc, cmds)
end

--- r:transaction(fn) -> { reply, ... } | nil, message, "redis" (EXECABORT, ...) |
-- nil, "transaction aborted", "aborted" (a WATCHed key changed) | nil, err, code.
-- The commands fn(p) queues run between MULTI and EXEC, written together (other tasks'
-- commands on the connection cannot come between them).
function Redis:transaction(fn)
  local cmds = recorded(fn, "transaction", { "MULTI" })
  cmds[#cmds + 1] = { "EXEC" }
  local res, err, code = rc_batch(self._rc, cmds)
  if not res then return nil, err, code end
  local exec = res[#res]
  if M.is_error(exec) then return nil, exec.message, "redis" end
  if exec == M.null then return nil, "transaction aborted", "aborted" end
  return exec
end

-- ---- scripts -----------------------------------------------------------------------------

local Script = {}
Script.__index = Script

--- redis.script(src) -> script; script:run(r, keys, args) runs it with EVALSHA, loading it
-- (EVAL) when the server answers NOSCRIPT. Same return convention as r:call.
function M.script(src)
  if type(src) ~= "string" then argerror(1, "script", "string expected, got " .. type(src)) end
  return setmetatable({ src = src, sha = core.sha1hex(src) }, Script)
end

-- keys and args: sequences of strings or numbers, or nil (none); checked here so that an
-- error names run's argument, not the position it would have in EVALSHA.
local function checklist(t, n, what)
  if t == nil then return {} end
  if type(t) ~= "table" then argerror(n, "run", "table of " .. what .. " expected, got " .. type(t), 3) end
  for i = 1, #t do
    local ti = type(t[i])
    if ti ~= "string" and ti ~= "number" then
      argerror(n, "run", ("%s[%d]: string or number expected, got %s"):format(what, i, ti), 3)
    end
  end
  return t
end

function Script:run(r, keys, args)
  if getmetatable(r) ~= Conn then argerror(1, "run", "moonwire.Redis expected, got " .. type(r)) end
  keys, args = checklist(keys, 2, "keys"), checklist(args, 3, "args")
  local nk = #keys
  local a = { self.sha, nk }
  for i = 1, nk do a[i + 2] = keys[i] end
  for i = 1, #args do a[nk + 2 + i] = args[i] end
  local v, err, code = rc_call(r._rc, "EVALSHA", unpack(a, 1, nk + 2 + #args))
  if v == nil and code == "redis" and err:find("^NOSCRIPT") then
    a[1] = self.src
    return rc_call(r._rc, "EVAL", unpack(a, 1, nk + 2 + #args))
  end
  return v, err, code
end

-- ---- pools -------------------------------------------------------------------------------

local Pool = {}
Pool.__index = Pool
Pool.__name = "moonwire.RedisPool"

--- redis.pool{ url = ..., size = 10, acquire_timeout = s, <connect options> } -> pool
-- One pool per origin: up to `size` connections, each lent to one task at a time.
function M.pool(opts)
  if type(opts) ~= "table" then argerror(1, "pool", "table expected, got " .. type(opts)) end
  local size = opts.size or 10
  if math.type(size) ~= "integer" or size < 1 then error("bad option 'size' (positive integer expected)", 2) end
  -- (a bad one raised from park, naming its argument, only once a task had to wait)
  -- (numbers or numeric strings, as every timeout: docs/api.md)
  if opts.acquire_timeout ~= nil and not tonumber(opts.acquire_timeout) then
    error("bad option 'acquire_timeout' (number expected, got " .. type(opts.acquire_timeout) .. ")", 2)
  end
  local copts = {}
  for k, v in pairs(opts) do
    if k ~= "size" and k ~= "acquire_timeout" then copts[k] = v end
  end
  settings(copts, nil, "pool")   -- checks the URL and options now
  -- _lent: the connections lent out (weak: one a borrower lost is still collected)
  return setmetatable({ _copts = copts, size = size, acquire_timeout = opts.acquire_timeout,
    _idle = {}, _n = 0, _waiters = { first = 1, last = 0 }, _lent = setmetatable({}, { __mode = "k" }) }, Pool)
end

local function lend(self, c)
  self._lent[c] = true
  return c
end

local function wake_waiter(self, value)
  local q = self._waiters
  while q.first <= q.last do
    local e = q[q.first]
    q[q.first] = nil
    q.first = q.first + 1
    if e.task and unpark(e.task, value) then
      e.task = nil
      return true
    end
  end
  return false
end

--- pool:acquire([timeout]) -> connection | nil, err, code: an idle connection, a new one
-- while fewer than `size` exist, else waits for a release.
function Pool:acquire(timeout)
  if not current() then error("blocking call outside a task ('acquire')", 2) end
  if timeout ~= nil and not tonumber(timeout) then   -- (numbers or numeric strings, as every timeout: docs/api.md)
    argerror(1, "acquire", "number expected, got " .. type(timeout))
  end
  while true do
    local idle = self._idle
    local c = idle[#idle]
    while c do
      idle[#idle] = nil
      if c:alive() then return lend(self, c) end
      self._n = self._n - 1
      c = idle[#idle]
    end
    if self._n < self.size then
      self._n = self._n + 1
      -- (a connect that raises, a bad option, gives its slot back)
      local done, conn, err, code = pcall(M.connect, self._copts)
      if not done then
        self._n = self._n - 1
        wake_waiter(self, false)
        error(conn, 0)
      end
      if not conn then
        self._n = self._n - 1
        wake_waiter(self, false)   -- another waiter may try in its turn
        return nil, err, code
      end
      return lend(self, conn)
    end
    local q = self._waiters
    local e = { task = current() }
    q.last = q.last + 1
    q[q.last] = e
    local v, err, code = park(timeout or self.acquire_timeout)
    e.task = nil
    if v == nil then return nil, err, code end
    if v then return v end    -- (release left it in _lent: lent again, to this task)
    -- false: a connection went away; try again
  end
end

--- pool:release(conn): back to the pool (a broken connection is dropped). Only a connection
-- this pool lent, once: a second release would let two borrowers share it (and count a
-- broken one's slot twice).
function Pool:release(c)
  if getmetatable(c) ~= Conn then argerror(1, "release", "moonwire.Redis expected, got " .. type(c)) end
  if not self._lent[c] then argerror(1, "release", "connection not lent out by this pool, or released already") end
  self._lent[c] = nil
  -- (one still owing replies, a blocking command that timed out say, is dropped: the next
  -- user would wait behind it, and a BLPOP still waiting on the server would take its data)
  if c:alive() and c._rc:pending() == 0 then
    c._rc:settimeout(c._opts.timeout or -1)   -- (r:settimeout is the borrower's, not the next one's)
    if wake_waiter(self, c) then
      self._lent[c] = true
      return
    end
    self._idle[#self._idle + 1] = c
  else
    c:close()
    self._n = self._n - 1
    wake_waiter(self, false)
  end
end

--- pool:call(cmd, ...): acquire, call, release.
function Pool:call(...)
  local c, err, code = self:acquire()
  if not c then return nil, err, code end
  local res = pack(pcall(rc_call, c._rc, ...))
  self:release(c)
  if not res[1] then error(res[2], 2) end
  return unpack(res, 2, res.n)
end

--- pool:close(): closes the idle connections (those lent out close when released broken).
function Pool:close()
  for i = #self._idle, 1, -1 do
    self._idle[i]:close()
    self._idle[i] = nil
    self._n = self._n - 1
  end
end

--- redis.subscriber(url_or_opts [, opts]) -> subscriber (see moonwire.redis.subscriber)
function M.subscriber(...) return require("moonwire.redis.subscriber").new(...) end

M.parse_url = parse_url
M._settings = settings         -- (redis.subscriber checks its options with it, up front)
return M
