-- spec/helper.lua: shared support for the moonwire specs (loaded by busted through `.busted`,
-- and by each spec through `require "spec.helper"`; both get the same table).
-- `helper.run` runs a test body as a task inside `mw.run` under a watchdog, so a stuck body
-- fails with "test timed out" instead of hanging the suite, and a failing task (the body, or
-- any task nobody joined) fails the test with its traceback. Also: open-fd counting, luv-style
-- `expect` (a callback that must run), small socket fixtures, and a subprocess runner for
-- behaviour that could take the whole test process down (signals, stderr output).

if package.loaded["spec.helper"] then return package.loaded["spec.helper"] end

local mw = require "moonwire"

-- Flush the report line by line: should the process die at exit (a crash in lua_close), the
-- summary has already reached a piped stdout instead of dying in its buffer.
io.stdout:setvbuf("line")

local helper = { mw = mw, LIMIT = 10 }

-- busted's assert (a failed check is reported as a test failure, not as an error)
local check = require "luassert"
local CALLER = check:level(2) -- report a failed check at the spec line that called the helper

local pack, unpack = table.pack, table.unpack

-- Expectations (luv's `expect`): a wrapped callback that must run exactly `count` times
-- (default 1) before the current `helper.run` ends (or before `helper.verify()`).
local expectations = {}

function helper.expect(fn, count)
  local info = debug.getinfo(2, "Sl")
  local e = { count = count or 1, calls = 0, where = info.short_src .. ":" .. info.currentline }
  expectations[#expectations + 1] = e
  return function(...)
    e.calls = e.calls + 1
    if fn then return fn(...) end
  end
end

function helper.verify()
  local list = expectations
  expectations = {}
  for _, e in ipairs(list) do
    if e.calls ~= e.count then
      error(("expected callback from %s to run %d time(s), it ran %d time(s)")
        :format(e.where, e.count, e.calls), 0)
    end
  end
end

-- Runs `fn(...)` as a task inside `mw.run`. The test fails if the body raises (the error keeps
-- the task's traceback), if it does not end within `limit` seconds ("test timed out"), if a
-- task nobody joined raised (reported through `mw.on_error`, unless the body installed its own
-- handler), or if an `expect`ed callback did not run. Tasks the body leaves behind are ended by
-- `mw.stop()` once the body returns. Returns the body's results.
function helper.run(fn, limit, ...)
  limit = limit or helper.LIMIT
  expectations = {}
  local args = pack(...)
  local timed_out, result = false, nil
  local unjoined = {}
  mw.on_error(function(err) unjoined[#unjoined + 1] = tostring(err) end)
  local ok, err = pcall(mw.run, function()
    mw.spawn(function()
      if mw.sleep(limit) then
        timed_out = true
        mw.stop()
      end
    end)
    local body = mw.spawn(fn, unpack(args, 1, args.n))
    result = pack(body:join())
    mw.stop()
  end)
  mw.on_error(nil)
  if timed_out then
    expectations = {}
    error(("test timed out (body still running after %g s)"):format(limit), 0)
  end
  if not ok then error("mw.run raised: " .. tostring(err), 0) end
  if not result then error("mw.run returned before the test body ended", 0) end
  if not result[1] then error(result[2], 0) end -- keeps busted failure objects
  if #unjoined > 0 then
    error("a task nobody joined raised:\n" .. table.concat(unjoined, "\n---\n"), 0)
  end
  helper.verify()
  return unpack(result, 2, result.n)
end

-- Calls fn(...) expecting it to raise; the error message must contain `text` (plain match).
-- Returns the message.
function helper.raises(text, fn, ...)
  local ok, err = pcall(fn, ...)
  check(not ok, "expected an error containing '" .. text .. "', but the call succeeded", CALLER)
  err = tostring(err)
  check(err:find(text, 1, true), "expected an error containing '" .. text .. "', got: " .. err, CALLER)
  return err
end

-- Asserts a `nil, message, code` failure with the given code (or one of a list of codes).
function helper.fails(codes, ok, msg, code, ...)
  if type(codes) == "string" then codes = { codes } end
  check(ok == nil, ("expected nil, message, code; got %s, %s, %s")
    :format(tostring(ok), tostring(msg), tostring(code)), CALLER)
  check(type(msg) == "string", "expected a string message, got " .. tostring(msg), CALLER)
  for _, c in ipairs(codes) do
    if code == c then return msg, code, ... end
  end
  check(false, ("expected code %s, got %s (%s)"):format(table.concat(codes, " or "),
    tostring(code), tostring(msg)), CALLER)
end

-- Number of open file descriptors of this process.
local has_lfs, lfs = pcall(require, "lfs")

function helper.pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("n")
  f:close()
  return math.tointeger(pid)
end

-- The pids of pid's child processes, sorted (pgrep).
function helper.children(pid)
  local p = io.popen("pgrep -P " .. pid)
  local out = {}
  for line in p:lines() do out[#out + 1] = tonumber(line) end
  p:close()
  table.sort(out)
  return out
end

-- Whether process pid exists (kill -0).
function helper.process_alive(pid)
  return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true
end

function helper.fd_count()
  local n = 0
  if has_lfs then
    for name in lfs.dir("/proc/self/fd") do
      if name ~= "." and name ~= ".." then n = n + 1 end
    end
  else
    local p = assert(io.popen("ls /proc/" .. helper.pid() .. "/fd"))
    for _ in p:lines() do n = n + 1 end
    p:close()
  end
  return n
end

-- A to-be-closed value that closes every given object (Lua allows one <close> per `local`).
function helper.closer(...)
  local objs = pack(...)
  return setmetatable({}, { __close = function()
    for i = 1, objs.n do
      if objs[i] then objs[i]:close() end
    end
  end })
end

-- A TCP listener on 127.0.0.1, port chosen by the kernel. Returns listener, port.
function helper.listen(opts)
  opts = opts or {}
  opts.host = opts.host or "127.0.0.1"
  opts.port = opts.port or 0
  local l = assert(mw.tcp.listen(opts))
  local _, port = l:getsockname()
  return l, port
end

-- A connected TCP pair (inside a task): client, server-side socket.
function helper.tcp_pair()
  local l, port = helper.listen()
  local c = assert(mw.tcp.connect("127.0.0.1", port, { timeout = 5 }))
  local s = assert(l:accept(5))
  l:close()
  return c, s
end

-- A port that nothing listens on (bound then released).
function helper.free_port()
  local l, port = helper.listen()
  l:close()
  return port
end

-- Whether this machine can listen on ::1 (checked once).
local ipv6
function helper.has_ipv6()
  if ipv6 == nil then
    local l = mw.tcp.listen { host = "::1", port = 0 }
    ipv6 = l ~= nil
    if l then l:close() end
  end
  return ipv6
end

-- A fresh path for a Unix socket (the file does not exist).
function helper.socket_path(tag)
  local name = os.tmpname()
  os.remove(name)
  return name .. "-" .. (tag or "mw") .. ".sock"
end

-- Puts the collector in incremental mode until the returned value is closed (then back to
-- the mode it was in). lua5.4 starts scripts in generational mode, whose minor and major
-- collections depend on what earlier tests left in the heap; a test that measures memory
-- growth uses this so that it measures the code, not the history.
function helper.incremental_gc()
  local previous = collectgarbage("incremental")
  collectgarbage()
  collectgarbage()
  return setmetatable({}, { __close = function() collectgarbage(previous) end })
end

-- A file's bytes, or nil when it cannot be read.
function helper.readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local data = f:read("a")
  f:close()
  return data
end

-- Writes data to a file (raises on failure); returns the path.
function helper.writefile(path, data)
  local f = assert(io.open(path, "wb"))
  assert(f:write(data))
  f:close()
  return path
end

-- Runs Lua source in a separate `lua5.4` process (with this process's module paths, so the
-- same build tree), killed after `limit` seconds; `env` (optional) adds environment
-- variables { NAME = value }. Returns its combined stdout+stderr, then "exit" and the exit
-- status or "signal" and the signal number (as io.popen's close says).
function helper.subprocess(source, limit, env)
  local file = os.tmpname()
  local f = assert(io.open(file, "w"))
  f:write(("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath), source)
  f:close()
  local vars = {}
  -- under `make test-asan` the module drops LD_PRELOAD; a child lua5.4 needs it back
  local preload = os.getenv("MW_ASAN_PRELOAD")
  if preload then vars[#vars + 1] = "LD_PRELOAD=" .. preload end
  for k, v in pairs(env or {}) do vars[#vars + 1] = ("%s='%s'"):format(k, (tostring(v):gsub("'", "'\\''"))) end
  local prefix = #vars > 0 and ("env " .. table.concat(vars, " ") .. " ") or ""
  local p = assert(io.popen(("%stimeout -k 1 %d lua5.4 %s 2>&1"):format(prefix, limit or 10, file)))
  local out = p:read("a")
  local _, how, code = p:close()
  os.remove(file)
  return out, how, code
end

-- Builds a C file into a shared object for LD_PRELOAD in a `helper.subprocess` (a libc call
-- made to fail: spec/fixtures/fail-shim.c). Returns its path; the caller removes it.
function helper.build_shim(source)
  local base = os.tmpname()
  os.remove(base)
  local so = base .. ".so"
  assert(os.execute(("cc -shared -fPIC -o %s %s -ldl"):format(so, source)), "cannot build " .. source)
  return so
end

-- Runs a shell command in the background (killed after `limit` seconds, default 20) and
-- waits for its exit from the loop, which keeps serving meanwhile (so the command may talk
-- to servers of the test). Returns exit code, stdout, stderr.
function helper.shell(cmd, limit)
  limit = limit or 20
  local base = os.tmpname()
  local out, err, rc = base .. ".out", base .. ".err", base .. ".rc"
  local quoted = "'" .. cmd:gsub("'", "'\\''") .. "'"
  local script = ("(timeout -k 2 %d sh -c %s) >%s 2>%s </dev/null; echo $? >%s.tmp; mv %s.tmp %s")
    :format(limit, quoted, out, err, rc, rc, rc)
  assert(os.execute("(" .. script .. ") >/dev/null 2>&1 &"))
  local deadline = mw.now() + limit + 5
  local code
  while true do
    local s = helper.readfile(rc)
    if s and s ~= "" then
      code = math.tointeger(tonumber(s))
      break
    end
    if mw.now() > deadline then error("command did not finish in time: " .. cmd, 2) end
    mw.sleep(0.01)
  end
  local o, e = helper.readfile(out) or "", helper.readfile(err) or ""
  for _, f in ipairs { base, out, err, rc } do os.remove(f) end
  return code, o, e
end

-- Parses a header dump (curl -D) into its status, lower-case name -> value (last wins) and
-- the list of response heads (1xx ones first).
function helper.parse_dump(text)
  local blocks = {}
  for block in (text .. "\r\n\r\n"):gmatch("(.-)\r\n\r\n") do
    if block ~= "" then blocks[#blocks + 1] = block end
  end
  local last = blocks[#blocks] or ""
  local status = tonumber(last:match("^HTTP/[%d.]+ (%d%d%d)"))
  local headers = {}
  for name, value in last:gmatch("\n([^:\r\n]+):%s*([^\r\n]*)") do headers[name:lower()] = value end
  return status, headers, blocks
end

-- A deterministic, position-dependent byte pattern of `n` bytes (detects reordering/loss).
function helper.pattern(n)
  local parts, size, i = {}, 0, 0
  while size < n do
    local block = ("%08x|abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV"):format(i)
    parts[#parts + 1] = block
    size = size + #block
    i = i + 1
  end
  return table.concat(parts):sub(1, n)
end

package.loaded["spec.helper"] = helper
-- Inflates `data` (a raw DEFLATE stream) through the inflater `inf` a byte at a time: each
-- call's output is a few bytes, so a back-reference farther than the inflater's window reaches
-- past what the window still holds, which zlib refuses ("invalid distance too far back"),
-- where one call over the whole stream would take any distance it has output. Used to check
-- that a peer's deflater keeps within a negotiated max_window_bits. Returns the output, or
-- nil and zlib's message.
function helper.strict_inflate(inf, data)
  local out = {}
  for i = 1, #data do
    local got, err = inf:decompress(data:sub(i, i))
    if not got then return nil, err end
    out[#out + 1] = got
  end
  return table.concat(out)
end

return helper
