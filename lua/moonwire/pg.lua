--- moonwire.pg: PostgreSQL through libpq's asynchronous API, on moonwire's loop.
-- The C layer (core.pg) owns the socket, the pipeline and the type mapping; this module adds
-- the public shape: connect with asynchronous DNS, exclusive use for transactions and COPY,
-- prepared statements, notifications and a pool. See docs/postgres.md.
local core = require "moonwire.core"

local C = core.pg
local new_channel = require "moonwire.channel"
local current, now = core.current, core.now
local pack, unpack = table.pack, table.unpack

local M = { null = C.null }

--- Marks a string to be sent in binary format (bytea parameters whose bytes must not be
-- read as escapes). Strings with NUL bytes are sent that way anyway.
function M.bytea(s)
  if type(s) ~= "string" then
    error(("bad argument #1 to 'bytea' (string expected, got %s)"):format(type(s)), 2)
  end
  return { bytea = s }
end

-- ---- host names: resolved on moonwire's resolver, then given to libpq as hostaddr -------

local function is_addr(h)
  return h == "" or h:find("^/") or h:find("^%d+%.%d+%.%d+%.%d+$") or h:find(":") or h:find(",")
end

-- Returns the conninfo with hostaddr added when its (single) host is a name.
local function with_hostaddr(info, timeout)
  local host
  local url = info:match("^postgres[q]?[l]?://(.*)$")
  if url then
    local auth = url:match("^([^/?]*)")
    host = auth:gsub("^.*@", "")
    if host:find("^%[") then return info end
    host = host:gsub(":%d*$", "")
    -- percent-encoded, as libpq reads it ("%2Ftmp%2Fsock": a socket directory)
    host = host:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    if url:find("[?&]hostaddr=") or url:find("[?&]host=") then return info end
  else
    if info:find("hostaddr%s*=") then return info end
    host = info:match("host%s*=%s*'([^']*)'") or info:match("host%s*=%s*(%S+)")
  end
  if not host or is_addr(host) then return info end
  local addrs, err, code = core.resolve(host, nil, timeout)
  if not addrs then return nil, err, code end
  local addr = addrs[1] and addrs[1].host
  if not addr then return nil, host .. ": no address", "dns" end
  if url then
    return info .. (info:find("?", 1, true) and "&" or "?") .. "hostaddr=" .. addr
  end
  return info .. " hostaddr=" .. addr
end

-- ---- connections ------------------------------------------------------------------------

local Db = {}
Db.__index = Db
Db.__name = "moonwire.pg.Connection"

local function self_task(fname)
  local t = current()
  if not t then error(("blocking call outside a task ('%s')"):format(fname), 3) end
  return t
end

-- Waits while another task holds the connection (a transaction, a COPY): on the channel
-- unlock closes (a task that gives up leaves it, as any channel receiver does).
local function wait_free(self, me)
  while self._owner and self._owner ~= me do
    local _, err, code = self._freed:recv()
    if code ~= "closed" then return nil, err, code end
  end
  return true
end

-- Takes the connection for this task; true, plus "held" when it already had it (a COPY
-- inside a transaction, a transaction on a connection taken with pool:acquire): the
-- matching unlock then leaves it held.
local function lock(self)
  local me = self_task("lock")
  if self._owner == me then return true, "held" end
  local ok, err, code = wait_free(self, me)
  if not ok then return nil, err, code end
  self._owner = me
  return true
end

-- Gives the connection back (to `to`, a task that held it before, or to everyone).
local function unlock(self, held, to)
  if held then return end
  self._owner = to
  local freed = self._freed
  self._freed = new_channel()
  freed:close()                 -- every task waiting for the connection: its turn
  if not to and self._on_release then self._on_release(self) end
end

local function cut_short(code) return code == "timeout" or code == "cancelled" end

-- What a task started on the connection and could not wait for to end (its mw.timeout ran
-- out, it was cancelled): a task of its own waits instead, holding the connection (nobody
-- else's statement may run before it is done). `finish(c)` returns true when the
-- connection is clean again; when it is not (or raises), the connection is marked broken,
-- so that status() says so, its queries fail with 08006 and a pool replaces it. Then the
-- connection goes back to `to` (the task that held it before) or to everyone.
local function settle(self, finish, to)
  if self._settling then                     -- one settler at a time: it runs this next
    local q = self._settling
    q[#q + 1] = finish
    return
  end
  local q = { finish }
  self._settling = q
  self._settle_to = to                         -- (pool:release may give it to the pool)
  self._owner = core.spawn(function()
    local i = 1
    while q[i] do
      local ok, clean = pcall(q[i], self._c)
      if not (ok and clean) then
        self._c:discard("connection discarded: a statement given up left it in an unknown state")
      end
      i = i + 1
    end
    self._settling = nil
    local to_task = self._settle_to
    local st = to_task and to_task:status()
    if st == "done" or st == "failed" then to_task = nil end
    unlock(self, false, to_task)
  end)
end

-- settle's finisher for a transaction: what is in flight ends, what is left open is
-- rolled back.
local function end_tx(c)
  if c:status() ~= "ok" then return false end
  if not c:sync() then return false end
  if c:txstatus() ~= "idle" then
    c:control("ROLLBACK")
    if not c:sync() then return false end
  end
  return c:txstatus() == "idle"
end

--- pg.connect(conninfo_or_url [, opts]) -> connection | nil, msg, code
-- opts: json = decode function for json/jsonb columns; connect_timeout (s);
-- query_timeout (s, per query: the server is asked to cancel it).
function M.connect(info, opts)
  if type(info) ~= "string" then
    error(("bad argument #1 to 'connect' (string expected, got %s)"):format(type(info)), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error(("bad argument #2 to 'connect' (table expected, got %s)"):format(type(opts)), 2)
  end
  opts = opts or {}
  if opts.json ~= nil and type(opts.json) ~= "function" then
    error("bad argument #2 to 'connect' (opts.json must be a function)", 2)
  end
  -- (one that is not a number raised an arithmetic error, or set_timeout's once connected;
  -- digits in a string did work, and still do)
  for _, k in ipairs { "connect_timeout", "query_timeout" } do
    if opts[k] ~= nil and not tonumber(opts[k]) then
      error(("bad argument #2 to 'connect' (opts.%s must be a number)"):format(k), 2)
    end
  end
  self_task("connect")
  local start = now()
  local conninfo, err, code = with_hostaddr(info, opts.connect_timeout)
  if not conninfo then return nil, err, code end
  local timeout = opts.connect_timeout
  if timeout then timeout = math.max(0, timeout - (now() - start)) end
  local c
  c, err, code = C.connect(conninfo, timeout)
  if not c then return nil, err, code end
  if opts.json then c:set_decoder(opts.json) end
  if opts.query_timeout then c:set_timeout(opts.query_timeout) end
  return setmetatable({ _c = c, _freed = new_channel(), created = now(), used = now() }, Db)
end

--- db:query(sql, ...) -> rows (rows.affected) | nil, msg, sqlstate, fields
function Db:query(sql, ...)
  if self._owner and self._owner ~= current() then
    local ok, err, code = wait_free(self, self_task("query"))
    if not ok then return nil, err, code end
  end
  return self._c:query(sql, ...)
end

local Stmt = {}
Stmt.__index = Stmt
local nstmt = 0

--- db:prepare([name,] sql) -> statement | nil, msg, sqlstate, fields
function Db:prepare(name, sql)
  if sql == nil then
    sql = name
    nstmt = nstmt + 1
    name = "mw_" .. nstmt
  end
  if type(sql) ~= "string" then
    error(("bad argument to 'prepare' (string expected, got %s)"):format(type(sql)), 2)
  end
  if self._owner and self._owner ~= current() then
    local ok, err, code = wait_free(self, self_task("prepare"))
    if not ok then return nil, err, code end
  end
  local ok, err, code, fields = self._c:prepare(name, sql)
  if not ok then return nil, err, code, fields end
  return setmetatable({ name = name, sql = sql, db = self }, Stmt)
end

--- db:execute(stmt, ...) -> as query
function Db:execute(stmt, ...)
  if type(stmt) ~= "table" or type(stmt.name) ~= "string" then
    error(("bad argument #1 to 'execute' (statement expected, got %s)"):format(type(stmt)), 2)
  end
  if self._owner and self._owner ~= current() then
    local ok, err, code = wait_free(self, self_task("execute"))
    if not ok then return nil, err, code end
  end
  return self._c:query_prepared(stmt.name, ...)
end

--- stmt:run(...) -> as query
function Stmt:run(...)
  return self.db:execute(self, ...)
end

-- The transaction's end never leaves the connection locked: its statements may raise (a
-- connection another task closed meanwhile does), and the waiting tasks must get their
-- turn (and that error) all the same. A statement whose wait was cut short (mw.timeout,
-- task:cancel) is still on its way to the server: settle() ends the transaction in a task
-- of its own, and the connection is handed out again only then.
local function tx_end(self, held, ...)
  self._txdepth = nil
  unlock(self, held)
  return ...
end

-- Runs sql to the end of the transaction; true, or nil, err, code, fields (the connection
-- then settled or given back).
local function tx_run(self, held, sql)
  local c = self._c
  local done, r, err, code, fields
  if sql then done, r, err, code, fields = pcall(c.control, c, sql)
  else done, r, err, code = pcall(c.sync, c) end
  if not done then
    tx_end(self, held)
    error(r, 0)
  end
  if not r and cut_short(code) then
    self._txdepth = nil
    settle(self, end_tx, held and current() or nil)
    return nil, err, code
  end
  return r, err, code, fields
end

-- Rolls back after fn: best effort, fn's own outcome is the one that counts.
local function tx_rollback(self, held)
  local r, err, code = tx_run(self, held, "ROLLBACK")
  if r or not cut_short(code) then tx_end(self, held) end
  return r, err, code
end

-- Whether the transaction is still good: everything sent inside it has ended (a statement
-- given up by its task may still run, and fail), and none failed.
local function tx_check(self, held)
  local c = self._c
  local ok, err, code = tx_run(self, held, nil)
  if not ok then return nil, err, code end
  local sok, status = pcall(c.txstatus, c)
  if sok and status == "inerror" then
    return nil, "transaction aborted by a failed statement", "25P02", true
  end
  return true
end

local function finish_tx(self, held, ok, ...)
  if not ok then                       -- fn raised: roll back, re-raise
    local err = ...
    pcall(tx_rollback, self, held)     -- (fn's error is the one that counts)
    error(err, 0)
  end
  if not (...) then                    -- fn returned nil/false, err...: roll back
    local r, _, code = tx_rollback(self, held)
    if not r and cut_short(code) then return nil, "timeout", code end
    return ...
  end
  local good, err, code, failed = tx_check(self, held)
  if not good then
    if failed then tx_rollback(self, held)
    elseif not cut_short(code) then tx_end(self, held) end
    return nil, err, code
  end
  local r, fields
  r, err, code, fields = tx_run(self, held, "COMMIT")
  if not r then
    if not cut_short(code) then tx_end(self, held) end
    return nil, err, code, fields
  end
  tx_end(self, held)
  if r.command == "ROLLBACK" then      -- the server refused: the transaction had failed
    return nil, "transaction aborted by a failed statement", "25P02"
  end
  return ...
end
-- A transaction inside a transaction (of the same task): a savepoint, released at the
-- end or rolled back to; the outer transaction keeps the connection and commits.
local function finish_nested(self, sp, depth, ok, ...)
  self._txdepth = depth
  local c = self._c
  if not ok then
    local err = ...
    pcall(c.control, c, "ROLLBACK TO SAVEPOINT " .. sp)
    error(err, 0)
  end
  if not (...) then
    c:control("ROLLBACK TO SAVEPOINT " .. sp)
    return ...
  end
  local r, err, code = c:sync()
  if not r then return nil, err, code end
  if c:txstatus() == "inerror" then
    c:control("ROLLBACK TO SAVEPOINT " .. sp)
    return nil, "transaction aborted by a failed statement", "25P02"
  end
  local fields
  r, err, code, fields = c:control("RELEASE SAVEPOINT " .. sp)
  if not r then return nil, err, code, fields end
  return ...
end

local function nested(self, fn, ...)
  local depth = self._txdepth
  local sp = "mw_savepoint_" .. depth
  local r, err, code, fields = self._c:control("SAVEPOINT " .. sp)
  if not r then return nil, err, code, fields end
  self._txdepth = depth + 1
  return finish_nested(self, sp, depth, pcall(fn, self, ...))
end

--- db:transaction(fn, ...) -> fn's results. BEGIN, fn(db, ...), COMMIT. Other tasks'
-- queries on this connection wait meanwhile. If fn raises: ROLLBACK and the error is
-- raised again; if fn returns nil or false (nil, err...): ROLLBACK and those values are
-- returned; if a statement failed inside: ROLLBACK, nil, msg, "25P02". Called inside fn:
-- the same with SAVEPOINT, ROLLBACK TO SAVEPOINT and RELEASE SAVEPOINT.
function Db:transaction(fn, ...)
  if type(fn) ~= "function" then
    error(("bad argument #1 to 'transaction' (function expected, got %s)"):format(type(fn)), 2)
  end
  if self._txdepth and self._owner == current() then return nested(self, fn, ...) end
  local ok, held, code = lock(self)
  if not ok then return nil, held, code end
  local r, err, fields
  r, err, code, fields = tx_run(self, held, "BEGIN")
  if not r then
    if not cut_short(code) then tx_end(self, held) end
    return nil, err, code, fields
  end
  self._txdepth = 1
  return finish_tx(self, held, pcall(fn, self, ...))
end

local function check_channel(channel, fname)
  if type(channel) ~= "string" then
    error(("bad argument #1 to '%s' (string expected, got %s)"):format(fname, type(channel)), 3)
  end
end

--- db:listen(channel) / db:unlisten(channel)
function Db:listen(channel)
  check_channel(channel, "listen")
  return self:query("LISTEN " .. self._c:escape_identifier(channel))
end

function Db:unlisten(channel)
  check_channel(channel, "unlisten")
  return self:query("UNLISTEN " .. self._c:escape_identifier(channel))
end

--- db:notification([timeout]) -> { channel=, payload=, pid= } | nil, msg, code
function Db:notification(timeout)
  local ch, payload, pid = self._c:notification(timeout)
  if not ch then return nil, payload, pid end
  return { channel = ch, payload = payload, pid = pid }
end

--- for n in db:notifications([timeout]) do ... end: ends on a timeout or a lost connection
function Db:notifications(timeout)
  -- (a bad one raised only at the loop's first step, naming 'notification')
  if timeout ~= nil and not tonumber(timeout) then
    error(("bad argument #1 to 'notifications' (number expected, got %s)"):format(type(timeout)), 2)
  end
  return function()
    return (self:notification(timeout))
  end
end

-- Ends a COPY TO whose rows nobody reads any more (its loop left early, a wait given up):
-- the rows that arrived are dropped, and a cancel request stops the rest only while rows are
-- still coming. A cancel acts on whatever the server runs when it arrives: had the COPY ended
-- meanwhile, it would stop the next statement on the connection. So the cancel must be seen
-- to land (the COPY fails with 57014), else it may still be on its way and the connection is
-- not clean. True when clean (the COPY's result read, when it was cancelled).
local function stop_copy_out(c)
  local ended = c:copy_drain()
  if ended ~= false then return ended == true end
  if not c:cancel() then return false end
  while c:copy_get() do end
  local _, _, code = c:x_result()
  return code == "57014"
end

-- settle's finisher for COPY: a COPY FROM is aborted, a COPY TO stopped, and the results
-- read to their end, back into pipeline mode.
local function end_exclusive(c)
  c:copy_end("abandoned")            -- in a COPY FROM: aborted (else a harmless failure)
  for _ = 1, 16 do
    local r = c:x_result()
    if r == false then return c:status() == "ok" end
    if r == "copy_in" then
      c:copy_end("abandoned")
    elseif r == "copy_out" then
      if not stop_copy_out(c) then return false end
    elseif r == nil and c:status() ~= "ok" then
      return false
    end
  end
  return false
end

-- A wait in exclusive mode was cut short: settle() finishes the COPY.
local function x_abandon(self, held, err, code)
  settle(self, end_exclusive, held and current() or nil)
  return nil, err, code
end

-- Reads the exclusive operation's results to their end (back in pipeline mode) and gives
-- the connection back; the first result, or nil, err, code, fields.
local function x_finish(self, held)
  local c = self._c
  local res, err, code, fields = c:x_result()
  if res == nil and cut_short(code) then return x_abandon(self, held, err, code) end
  while res ~= false do
    local more, merr, mcode = c:x_result()
    if more == false then break end
    if more == nil then
      if cut_short(mcode) then return x_abandon(self, held, merr, mcode) end
      if c:status() ~= "ok" then break end
    end
  end
  unlock(self, held)
  return res, err, code, fields
end

local function copy_finish(self, held)
  local res, err, code, fields = x_finish(self, held)
  if not res then return nil, err, code, fields end
  return res.affected or 0
end

-- Takes the connection for COPY: exclusive, drained, out of pipeline mode. Returns
-- "copy_in" or "copy_out", and whether the task held the connection already.
local function copy_begin(self, sql)
  local ok, held, code = lock(self)
  if not ok then return nil, held, code end
  local c = self._c
  local err
  ok, err, code = c:sync()
  if ok then ok, err, code = c:x_begin(sql) end
  if not ok then
    unlock(self, held)
    return nil, err, code
  end
  local st, fields
  st, err, code, fields = c:x_result()
  if st == "copy_in" or st == "copy_out" then return st, held end
  if st == nil and cut_short(code) then return x_abandon(self, held, err, code) end
  -- not a COPY: collect the end and give the connection back
  local r, ferr, fcode = x_finish(self, held)
  if r == nil and cut_short(fcode) then return nil, ferr, fcode end
  if st then return nil, "not a COPY statement", "42601" end
  return nil, err, code, fields
end

-- Reads a COPY TO out, for nothing; true, or nil, err, code when a wait was cut short.
local function copy_skip(self, held)
  local c = self._c
  while true do
    local chunk, err, code = c:copy_get()
    if not chunk then
      if chunk == nil and cut_short(code) then return x_abandon(self, held, err, code) end
      return true
    end
  end
end

--- db:copy_from(sql, source) -> rows copied | nil, msg, code
-- source: a string, an array of strings, or a function returning the next chunk (nil at
-- the end). Chunks go out as they come, so memory stays flat.
function Db:copy_from(sql, src)
  if type(sql) ~= "string" then
    error(("bad argument #1 to 'copy_from' (string expected, got %s)"):format(type(sql)), 2)
  end
  local ts = type(src)
  if ts ~= "string" and ts ~= "table" and ts ~= "function" then
    error(("bad argument #2 to 'copy_from' (string, table or function expected, got %s)"):format(ts), 2)
  end
  local st, held, code, fields = copy_begin(self, sql)
  if not st then return nil, held, code, fields end
  local c = self._c
  if st ~= "copy_in" then
    local sk, skerr, skcode = copy_skip(self, held)
    if not sk then return nil, skerr, skcode end
    local _, err, ecode = x_finish(self, held)
    if cut_short(ecode) then return nil, err, ecode end
    return nil, "not a COPY FROM STDIN statement", "42601"
  end
  local next_chunk
  if type(src) == "string" then
    local done = false
    next_chunk = function() if done then return nil end done = true return src end
  elseif type(src) == "table" then
    local i = 0
    next_chunk = function() i = i + 1 return src[i] end
  else
    next_chunk = src
  end
  local ok, sent, serr, scode = pcall(function()
    local n = 0
    while true do
      local chunk = next_chunk()
      if chunk == nil then break end
      n = n + 1
      -- (it raised copy_put's error, naming an argument of a function the caller never saw)
      if type(chunk) ~= "string" and type(chunk) ~= "number" then
        error(("bad argument #2 to 'copy_from' (chunk %d: string expected, got %s)"):format(n, type(chunk)), 0)
      end
      local put, perr, pcode = c:copy_put(chunk)
      if not put then return nil, perr, pcode end
    end
    return true
  end)
  if not ok or not sent then               -- the source raised, or a chunk could not go
    if ok and cut_short(scode) then return x_abandon(self, held, serr, scode) end
    local e, eerr, ecode = c:copy_end(ok and tostring(serr) or tostring(sent))
    if not e and cut_short(ecode) then x_abandon(self, held, eerr, ecode)
    else
      local _, ferr, fcode = x_finish(self, held)
      if ok and cut_short(fcode) then return nil, ferr, fcode end
    end
    if not ok then error(sent, 0) end
    return nil, serr, scode
  end
  local e, eerr, ecode = c:copy_end()
  if not e then
    if cut_short(ecode) then return x_abandon(self, held, eerr, ecode) end
    x_finish(self, held)
    return nil, eerr, ecode
  end
  return copy_finish(self, held)
end

--- db:copy_to(sql) -> iterator of chunks (lines of COPY's text format), for a generic for;
-- leaving the loop early stops the COPY (the iterator's closing value): see stop_copy_out.
function Db:copy_to(sql)
  if type(sql) ~= "string" then
    error(("bad argument #1 to 'copy_to' (string expected, got %s)"):format(type(sql)), 2)
  end
  local st, held, code = copy_begin(self, sql)
  if not st then error(("copy_to: %s (%s)"):format(held, code), 2) end
  local c = self._c
  local done = false
  if st ~= "copy_out" then
    if c:copy_end("not COPY TO STDOUT") then x_finish(self, held)
    else x_abandon(self, held) end
    error("copy_to: not a COPY TO STDOUT statement", 2)
  end
  local closer = setmetatable({}, { __close = function()
    if done then return end
    done = true
    x_abandon(self, held)            -- the rows left: stopped, in a task of its own
  end })
  return function()
    if done then return nil end
    local chunk, cerr, ccode = c:copy_get()
    if chunk then return chunk end
    done = true
    if chunk == nil then
      if cut_short(ccode) then x_abandon(self, held)
      else x_finish(self, held) end
      error(("copy_to: %s (%s)"):format(cerr, ccode), 2)
    end
    local n, ferr, fcode = copy_finish(self, held)
    if not n then error(("copy_to: %s (%s)"):format(ferr, fcode), 2) end
    return nil
  end, nil, nil, closer
end

--- db:cancel() -> asks the server to stop the statement it runs for this connection
function Db:cancel() return self._c:cancel() end

--- db:status() -> "ok" | "broken" | "closed", queries in flight
function Db:status() return self._c:status() end

function Db:escape_identifier(s) return self._c:escape_identifier(s) end

function Db:close() self._c:close() end
Db.__close = Db.close

-- ---- the pool ---------------------------------------------------------------------------

local Pool = {}
Pool.__index = Pool
Pool.__name = "moonwire.pg.Pool"

--- pg.pool{ url=, size=10, max_lifetime=s, check_after=s, acquire_timeout=s, json=,
--   connect_timeout=, query_timeout= } -> pool
function M.pool(opts)
  if type(opts) ~= "table" or type(opts.url) ~= "string" then
    error("bad argument #1 to 'pool' (table with url expected)", 2)
  end
  local size = opts.size or 10
  if math.type(size) ~= "integer" or size < 1 then
    error("bad argument #1 to 'pool' (size must be a positive integer)", 2)
  end
  -- (a string raised an arithmetic error at the first query or acquire; a numeric one is
  -- taken, as every timeout: docs/api.md)
  for _, k in ipairs { "acquire_timeout", "max_lifetime", "check_after" } do
    if opts[k] ~= nil and not tonumber(opts[k]) then
      error(("bad argument #1 to 'pool' (%s must be a number)"):format(k), 2)
    end
  end
  return setmetatable({ opts = opts, size = size, conns = {}, opening = 0, waitq = new_channel(), waiting = 0,
    max_lifetime = tonumber(opts.max_lifetime), check_after = tonumber(opts.check_after) or 30 }, Pool)
end

local function pool_wake(self)
  local q = self.waitq
  self.waitq = new_channel()
  q:close()                     -- every task waiting for a connection: a look again
end

local function pool_remove(self, db)
  for i, d in ipairs(self.conns) do
    if d == db then table.remove(self.conns, i) break end
  end
  db:close()
  pool_wake(self)
end

local function pool_open(self)
  self.opening = self.opening + 1
  -- (a connect that raises, a bad option, must give its opening slot back)
  local done, db, err, code = pcall(M.connect, self.opts.url, self.opts)
  self.opening = self.opening - 1
  if not done then
    pool_wake(self)
    error(db, 0)
  end
  if not db then
    pool_wake(self)
    return nil, err, code
  end
  if self.closed then                -- closed while it connected: nobody would close it
    db:close()
    return nil, "pool closed", "closed"
  end
  db._on_release = function() pool_wake(self) end
  self.conns[#self.conns + 1] = db
  pool_wake(self)   -- those waiting while it opened may share it
  return db
end

-- Drops broken connections and idle ones past max_lifetime; returns the usable
-- connection with the fewest queries in flight and that number. A connection a cancel
-- request was sent on is retired as an old one is (taken by nobody, closed once idle): the
-- server signals a cancelled backend twice (the process, then its group), and the second
-- signal may come late enough to stop the next statement sent on it ("Cancelling").
local function pool_scan(self, exclusive)
  local best, bn
  local t = now()
  local conns = self.conns
  local i = 1
  while i <= #conns do
    local db = conns[i]
    local st, n, cancels = db._c:status()
    local old = cancels > 0 or (self.max_lifetime and t - db.created > self.max_lifetime)
    if st ~= "ok" or (old and n == 0 and not db._owner) then
      table.remove(conns, i)
      db:close()
    else
      if not db._owner and not old and (not exclusive or n == 0) and (not best or n < bn) then
        best, bn = db, n
      end
      i = i + 1
    end
  end
  return best, bn
end

-- A connection for one pipelined query (shared), or for exclusive use.
local function pool_pick(self, exclusive, deadline)
  self_task("pool")
  local open_failed = false
  while true do
    if self.closed then return nil, "pool closed", "closed" end
    local db, n = pool_scan(self, exclusive)
    if not open_failed and (not db or n > 0) and #self.conns + self.opening < self.size then
      local ndb, err, code = pool_open(self)
      if ndb then return ndb end
      if not db then return nil, err, code end
      -- the connection chosen before opening may have broken meanwhile: look again
      open_failed = true
      goto continue
    end
    if db and n == 0 and db._c:check() ~= "ok" then   -- idle, and the server went away
      pool_remove(self, db)
      goto continue
    end
    if db then
      if exclusive and self.check_after and now() - db.used > self.check_after then
        if not db._c:query("SELECT 1") then pool_remove(self, db) db = nil end
      end
      if db then return db end
    else
      local left = deadline and deadline - now()
      if left and left <= 0 then return nil, "timeout waiting for a connection", "timeout" end
      self.waiting = self.waiting + 1
      local _, err, code = self.waitq:recv(left)
      self.waiting = self.waiting - 1
      if code == "timeout" and deadline and now() >= deadline then
        return nil, "timeout waiting for a connection", "timeout"
      end
      if code ~= "closed" then return nil, err, code end
    end
    ::continue::
  end
end

-- A query whose wait was cut short is still in flight, and with no other task's query on
-- the connection nobody reads its result: status() would count it for good, and acquire
-- (which needs none in flight) never take the connection again. A task of its own waits
-- for it (a sync), then those waiting for a connection look again.
local function pool_query_end(self, db, ...)
  if not (...) and cut_short(select(3, ...)) and not db._draining then
    db._draining = true
    core.spawn(function()
      local c = db._c
      local _, n = c:status()
      if n > 0 and not db._owner then pcall(c.sync, c) end
      db._draining = nil
      pool_wake(self)
    end)
  elseif self.waiting > 0 and select(2, db._c:status()) == 0 then
    -- its last query in flight is over: a task waiting for a connection to itself
    -- (acquire, transaction), or a retired one's slot, may go on now
    pool_wake(self)
  end
  return ...
end

--- pool:query(sql, ...) -> as db:query, on the least busy connection (waiting for one up
-- to acquire_timeout when every connection is held)
function Pool:query(sql, ...)
  local t = tonumber(self.opts.acquire_timeout)
  local db, err, code = pool_pick(self, false, t and now() + t)
  if not db then return nil, err, code end
  db.used = now()
  return pool_query_end(self, db, db:query(sql, ...))
end

--- pool:acquire() -> db for exclusive use until pool:release(db) | nil, msg, code
function Pool:acquire()
  local t = tonumber(self.opts.acquire_timeout)
  local db, err, code = pool_pick(self, true, t and now() + t)
  if not db then return nil, err, code end
  db._owner = current()
  db._lent = self
  db.used = now()
  return db
end

-- A connection goes back clean: no transaction left open (pool:acquire's user may have
-- run BEGIN, or given up waiting for its COMMIT), nothing of its user's still in flight.
function Pool:release(db)
  -- Only a connection this pool lent, once: a second release (after another task acquired
  -- it) handed it to a third borrower while the second still used it.
  if getmetatable(db) ~= Db then
    error(("bad argument #1 to 'release' (moonwire.pg.Connection expected, got %s)"):format(type(db)), 2)
  end
  if db._lent ~= self then
    error("bad argument #1 to 'release' (connection not lent out by this pool, or released already)", 2)
  end
  db._lent = nil
  if db._settling then                  -- its settler gives it back, to the pool
    db._settle_to = nil
    return
  end
  local st, n = db._c:status()
  if st ~= "ok" then
    pool_remove(self, db)
  elseif n > 0 or db._c:txstatus() ~= "idle" then
    return settle(db, end_tx)
  end
  unlock(db)
end

--- pool:transaction(fn, ...) -> as db:transaction, on an acquired connection
function Pool:transaction(fn, ...)
  local db, err, code = self:acquire()
  if not db then return nil, err, code end
  db._owner = nil
  local r = pack(pcall(db.transaction, db, fn, ...))
  self:release(db)
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, r.n)
end

function Pool:close()
  self.closed = true
  for _, db in ipairs(self.conns) do db:close() end
  self.conns = {}
  pool_wake(self)
end
Pool.__close = Pool.close

return M
