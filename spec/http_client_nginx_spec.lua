-- HTTP/1.1 client (docs/client.md) against a real nginx that this spec starts with its own
-- configuration in a temporary directory (Debian's /usr/sbin/nginx, no master process, one
-- worker, listening on 127.0.0.1 on a port picked by binding port 0 first). Keep-alive reuse
-- is proven from nginx's access log ($connection, $connection_requests); a 200 MiB (sparse)
-- file is downloaded and a 200 MiB body uploaded (WebDAV PUT, size and bytes checked on disk)
-- in flat memory; redirects (301/302/303/307/308, absolute and relative Location), gzip and
-- chunked responses (gzip and sub_filter make nginx answer chunked), 1,000 requests through
-- a pool of 50, an idle connection nginx closes (keepalive_timeout).

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local KiB, MiB = 1024, 1024 * 1024
local NGINX = "/usr/sbin/nginx"
local SIZE = 200 * MiB

local readfile = helper.readfile

local writefile = helper.writefile

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local size = f:seek("end")
  f:close()
  return size
end

local function rss_kib()
  local text = readfile("/proc/self/status")
  return text and tonumber(text:match("VmRSS:%s*(%d+)"))
end

-- Waits (bounded, from the loop) until `cond()` holds.
local function wait_for(cond, limit)
  local deadline = mw.now() + (limit or 5)
  while not cond() do
    if mw.now() > deadline then return false end
    mw.sleep(0.01)
  end
  return true
end

---------------------------------------------------------------------------------------------
-- nginx

local TEXT_LINES = {}
for i = 1, 300 do TEXT_LINES[i] = ("line %d of some compressible text, text, text\n"):format(i) end
local TEXT = table.concat(TEXT_LINES)

local ngx = {}  -- dir, port, base

local CONF = [[
daemon off;
master_process off;
worker_processes 1;
error_log DIR/error.log;
pid DIR/nginx.pid;
events { worker_connections 2048; }
http {
  log_format mw '$connection $connection_requests "$request" $status $bytes_sent';
  access_log DIR/access.log mw;
  client_body_temp_path DIR/tmp/body;
  proxy_temp_path DIR/tmp/proxy;
  fastcgi_temp_path DIR/tmp/fastcgi;
  uwsgi_temp_path DIR/tmp/uwsgi;
  scgi_temp_path DIR/tmp/scgi;
  default_type application/octet-stream;
  types { text/plain txt; }
  keepalive_timeout 60s;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:PORT;
    root DIR/www;
    location = /ok { return 200 "ok"; }
    location = /x { return 200 "x"; }
    location = /moved { return 301 /x; }
    location = /found-rel { absolute_redirect off; return 302 /x; }
    location = /see-other { return 303 /x; }
    location = /temp { return 307 /up/via307.bin; }
    location = /perm { absolute_redirect off; return 308 /up/via308.bin; }
    location = /short { keepalive_timeout 300ms; return 200 "short"; }
    location /gz/ { alias DIR/www/; gzip on; gzip_types text/plain; gzip_min_length 1; }
    location /sub/ { alias DIR/www/; sub_filter 'line' 'LINE'; sub_filter_once off; sub_filter_types text/plain; }
    location /up/ {
      root DIR;
      dav_methods PUT DELETE;
      create_full_put_path on;
      client_max_body_size 300m;
    }
  }
}
]]

local function start_nginx()
  local f = io.open(NGINX)
  assert(f, NGINX .. " is not installed")
  f:close()
  local dir = os.tmpname()
  os.remove(dir)
  ngx.dir = dir
  assert(os.execute(("mkdir -p %s/www %s/up %s/tmp"):format(dir, dir, dir)))
  -- a sparse 200 MiB file whose last three bytes are "END"
  local big = dir .. "/www/big.bin"
  assert(os.execute(("truncate -s %d %s"):format(SIZE, big)))
  local bf = assert(io.open(big, "r+b"))
  assert(bf:seek("set", SIZE - 3))
  assert(bf:write("END"))
  bf:close()
  writefile(dir .. "/www/text.txt", TEXT)
  run(function()
    local l = assert(mw.tcp.listen { host = "127.0.0.1", port = 0 })
    local _, port = l:getsockname()
    l:close()
    ngx.port = port
  end)
  ngx.base = "http://127.0.0.1:" .. ngx.port
  writefile(dir .. "/nginx.conf", (CONF:gsub("DIR", dir):gsub("PORT", tostring(ngx.port))))
  -- in the background: io.popen returns at once; its handle lets teardown reap the process
  ngx.proc = assert(io.popen(("exec %s -c %s/nginx.conf -p %s >%s/stdout 2>&1 </dev/null")
    :format(NGINX, dir, dir, dir)))
  -- wait (bounded) until it answers
  local up = run(function()
    return wait_for(function()
      local s = mw.tcp.connect("127.0.0.1", ngx.port, { timeout = 1 })
      if not s then return false end
      s:close()
      return true
    end, 10)
  end, 15)
  if not up then
    error("nginx did not start: " .. tostring(readfile(dir .. "/stdout")) .. tostring(readfile(dir .. "/error.log")))
  end
end

local function stop_nginx()
  local dir = ngx.dir
  if not dir then return end
  local pid = math.tointeger(tonumber(readfile(dir .. "/nginx.pid") or ""))
  if pid then
    os.execute("kill " .. pid .. " 2>/dev/null")
    -- nginx removes its pid file on the way out; a process ignoring TERM gets KILL
    local gone = run(function()
      return wait_for(function()
        local stat = readfile("/proc/" .. pid .. "/stat")
        return not readfile(dir .. "/nginx.pid") or not stat or stat:match("^%d+ %b() (%a)") == "Z"
      end, 5)
    end, 10)
    if not gone then os.execute("kill -KILL " .. pid .. " 2>/dev/null") end
  end
  if ngx.proc then
    ngx.proc:close() -- reaps it
    ngx.proc = nil
  end
  os.execute("rm -rf " .. dir)
  ngx.dir = nil
end

-- The access log: { conn, n (the request's number on its connection), method, target,
-- status } per line.
local function access_log()
  local entries = {}
  for line in (readfile(ngx.dir .. "/access.log") or ""):gmatch("[^\n]+") do
    local conn, n, method, target, status = line:match('^(%d+) (%d+) "(%S+) (%S+)[^"]*" (%d+)')
    if conn then
      entries[#entries + 1] = { conn = tonumber(conn), n = tonumber(n), method = method, target = target,
                                status = tonumber(status) }
    end
  end
  return entries
end

-- The log entries whose target contains `tag`, once `count` of them are there (nginx writes
-- a line when it has sent the response, so the client may be a moment ahead).
local function logged(tag, count)
  local got
  local ok = wait_for(function()
    got = {}
    for _, e in ipairs(access_log()) do
      if e.target:find(tag, 1, true) then got[#got + 1] = e end
    end
    return #got >= count
  end)
  assert(ok, ("expected %d access log lines for %s, found %d"):format(count, tag, #got))
  return got
end

local function distinct_conns(entries)
  local seen, n = {}, 0
  for _, e in ipairs(entries) do
    if not seen[e.conn] then
      seen[e.conn] = true
      n = n + 1
    end
  end
  return n
end

---------------------------------------------------------------------------------------------

describe("http client against nginx", function()
  setup(start_nginx)
  teardown(stop_nginx)

  it("GET: status, headers and body from nginx", function()
    run(function()
      local c = http.client()
      local res = assert(c:get(ngx.base .. "/ok"))
      assert.equal(200, res.status)
      assert.equal("OK", res.reason)
      assert.equal("1.1", res.version)
      assert.matches("^nginx", res.headers.server)
      assert.equal("2", res.headers["content-length"])
      assert.equal("ok", res:body())
      res = assert(c:get(ngx.base .. "/no-such-file"))
      assert.equal(404, res.status)
      assert.matches("404 Not Found", res:body())
      c:close()
    end)
  end)

  it("keep-alive: 20 sequential requests on one connection ($connection, $connection_requests)", function()
    run(function()
      local c = http.client()
      for i = 1, 20 do
        assert.equal("ok", assert(c:get(ngx.base .. "/ok?keepalive=" .. i)):body())
      end
      local log = logged("keepalive=", 20)
      assert.equal(1, distinct_conns(log))
      local first = log[1].n
      for i, e in ipairs(log) do
        assert.equal("/ok?keepalive=" .. i, e.target)
        assert.equal(first + i - 1, e.n)
      end
      c:close()
    end)
  end)

  it("HEAD of the 200 MiB file: Content-Length, no body; the next request uses the same connection", function()
    run(function()
      local c = http.client()
      local res = assert(c:request { url = ngx.base .. "/big.bin?head=1", method = "HEAD", timeout = 5 })
      assert.equal(200, res.status)
      assert.equal(tostring(SIZE), res.headers["content-length"])
      assert.equal("", res:body())
      assert.equal("ok", assert(c:get(ngx.base .. "/ok?head=2", { timeout = 5 })):body())
      local log = logged("head=", 2)
      assert.equal("HEAD", log[1].method)
      assert.equal(1, distinct_conns(log))
      c:close()
    end)
  end)

  it("downloads the 200 MiB file with body_reader() in flat memory; every byte arrives", function()
    run(function()
      local c = http.client()
      local _gc <close> = helper.incremental_gc()
      local lua0, rss0 = collectgarbage("count"), rss_kib()
      local lua_max, rss_max = lua0, rss0
      local res = assert(c:get(ngx.base .. "/big.bin?download=1", { timeout = 60 }))
      assert.equal(tostring(SIZE), res.headers["content-length"])
      local total, n, first_nonzero, tail = 0, 0, nil, ""
      for chunk in res:body_reader() do
        local p = chunk:find("[^%z]")
        if p and not first_nonzero then first_nonzero = total + p end
        total = total + #chunk
        tail = (tail .. chunk:sub(-3)):sub(-3)
        n = n + 1
        if n % 64 == 0 then
          lua_max = math.max(lua_max, collectgarbage("count"))
          if rss0 then rss_max = math.max(rss_max, rss_kib()) end
        end
      end
      assert.equal(SIZE, total)
      assert.equal("END", tail)
      assert.equal(SIZE - 2, first_nonzero) -- zeros, then "END"
      local growth = (lua_max - lua0) / 1024
      assert.is_true(growth < 20, ("Lua memory grew by %.1f MiB"):format(growth))
      if rss0 then
        assert.is_true((rss_max - rss0) / 1024 < 100, ("RSS grew by %.1f MiB"):format((rss_max - rss0) / 1024))
      end
      assert.same({ idle = 1, active = 0 }, c:stats())
      c:close()
    end, 90)
  end)

  it("res:body() of the 200 MiB file with the default max_body (64 MiB): 'toolarge'", function()
    run(function()
      local c = http.client()
      local res = assert(c:get(ngx.base .. "/big.bin?toolarge=1"))
      local t0 = mw.now()
      helper.fails("toolarge", res:body())
      assert.is_true(mw.now() - t0 < 5)
      assert.same({ idle = 0, active = 0 }, c:stats())
      c:close()
    end, 20)
  end)

  it("uploads 200 MiB from a body function (chunked PUT) in flat memory; the file on disk matches", function()
    run(function()
      local block = helper.pattern(64 * KiB)
      local c = http.client()
      local _gc <close> = helper.incremental_gc()
      local lua0, rss0 = collectgarbage("count"), rss_kib()
      local lua_max, rss_max = lua0, rss0
      local sent, calls = 0, 0
      local res = assert(c:request { url = ngx.base .. "/up/big-upload.bin", method = "PUT", timeout = 120,
        body = function()
          calls = calls + 1
          if calls % 64 == 0 then
            lua_max = math.max(lua_max, collectgarbage("count"))
            if rss0 then rss_max = math.max(rss_max, rss_kib()) end
          end
          if sent >= SIZE then return nil end
          sent = sent + #block
          return block
        end })
      assert.equal(201, res.status)
      res:body()
      local growth = (lua_max - lua0) / 1024
      assert.is_true(growth < 20, ("Lua memory grew by %.1f MiB"):format(growth))
      if rss0 then
        assert.is_true((rss_max - rss0) / 1024 < 100, ("RSS grew by %.1f MiB"):format((rss_max - rss0) / 1024))
      end
      local path = ngx.dir .. "/up/big-upload.bin"
      assert.equal(SIZE, file_size(path))
      local f = assert(io.open(path, "rb"))
      local i = 0
      while true do
        local piece = f:read(#block)
        if not piece then break end
        i = i + 1
        if piece ~= block then
          f:close()
          error(("uploaded file differs in block %d"):format(i))
        end
      end
      f:close()
      assert.equal(SIZE // #block, i)
      os.remove(path)
      c:close()
    end, 120)
  end)

  it("PUT with a string, a table and a function body with a content-length; GET reads each back", function()
    run(function()
      local c = http.client()
      local data = helper.pattern(100 * KiB)
      local function pieces()
        local i = 0
        return function()
          i = i + 1
          local p = data:sub((i - 1) * 7000 + 1, i * 7000)
          return p ~= "" and p or nil
        end
      end
      local cases = {
        { "string.bin", data },
        { "table.bin", { data:sub(1, 1000), data:sub(1001, 50000), data:sub(50001) } },
        { "function.bin", pieces() },
        { "function-length.bin", pieces(), { ["Content-Length"] = tostring(#data) } },
      }
      for _, case in ipairs(cases) do
        local name = case[1]
        local res = assert(c:request { url = ngx.base .. "/up/" .. name, method = "PUT", body = case[2],
                                       headers = case[3] })
        assert.equal(201, res.status, name)
        res:body()
        local stored = readfile(ngx.dir .. "/up/" .. name)
        assert.equal(#data, #stored, name)
        assert.is_true(stored == data, name .. ": the file nginx stored differs from the body sent"
          .. " (it starts with " .. ("%q"):format(stored:sub(1, 12)) .. ")")
        res = assert(c:get(ngx.base .. "/up/" .. name))
        assert.equal(200, res.status, name)
        local back = res:body()
        assert.equal(#data, #back, name)
        assert.is_true(back == data, name .. ": the bytes read back differ from those sent")
      end
      c:close()
    end, 20)
  end)

  it("301 with an absolute Location and 302 with a relative one are followed; redirects = 0 returns them", function()
    run(function()
      local c = http.client()
      local res = assert(c:get(ngx.base .. "/moved"))
      assert.equal(200, res.status)
      assert.equal("x", res:body())
      assert.equal(ngx.base .. "/x", res.url)
      res = assert(c:get(ngx.base .. "/found-rel"))
      assert.equal("x", res:body())
      assert.equal(ngx.base .. "/x", res.url)
      res = assert(c:get(ngx.base .. "/moved", { redirects = 0 }))
      assert.equal(301, res.status)
      assert.equal(ngx.base .. "/x", res.headers.location)
      assert.matches("301 Moved Permanently", res:body())
      res = assert(c:get(ngx.base .. "/found-rel", { redirects = 0 }))
      assert.equal(302, res.status)
      assert.equal("/x", res.headers.location)
      res:body()
      c:close()
    end)
  end)

  it("301 and 303 turn a POST into a GET; 307 and 308 repeat a PUT with its body (stored by nginx)", function()
    run(function()
      local c = http.client()
      local res = assert(c:post(ngx.base .. "/moved?m=1", "form=data"))
      assert.equal("x", res:body())
      res = assert(c:post(ngx.base .. "/see-other?m=2", "form=data"))
      assert.equal("x", res:body())
      local log = access_log()
      local methods = {}
      for _, e in ipairs(log) do
        if e.target == "/moved?m=1" or e.target == "/see-other?m=2" then methods[#methods + 1] = e.method end
      end
      assert.same({ "POST", "POST" }, methods)
      for _, case in ipairs { { "/temp", "via307.bin", "seven oh seven" },
                              { "/perm", "via308.bin", "three oh eight" } } do
        res = assert(c:request { url = ngx.base .. case[1], method = "PUT", body = case[3] })
        assert.equal(201, res.status, case[1])
        assert.equal(ngx.base .. "/up/" .. case[2], res.url)
        res:body()
        assert.equal(case[3], readfile(ngx.dir .. "/up/" .. case[2]))
      end
      c:close()
    end)
  end)

  it("gzip: a chunked gzip response is decoded with decompress = true; identity without", function()
    run(function()
      local c = http.client()
      local res = assert(c:get(ngx.base .. "/gz/text.txt", { decompress = true }))
      assert.equal(200, res.status)
      assert.equal("gzip", res.headers["content-encoding"])
      assert.equal("chunked", res.headers["transfer-encoding"])
      assert.equal(TEXT, res:body())
      res = assert(c:get(ngx.base .. "/gz/text.txt", { decompress = true }))
      local parts = {}
      for chunk in res:body_reader() do parts[#parts + 1] = chunk end
      assert.equal(TEXT, table.concat(parts))
      res = assert(c:get(ngx.base .. "/gz/text.txt"))
      assert.is_nil(res.headers["content-encoding"])
      assert.equal(tostring(#TEXT), res.headers["content-length"])
      assert.equal(TEXT, res:body())
      c:close()
    end)
  end)

  it("chunked: a sub_filter response without a known length, via body() and body_reader()", function()
    run(function()
      local c = http.client()
      local expected = TEXT:gsub("line", "LINE")
      local res = assert(c:get(ngx.base .. "/sub/text.txt?chunked=1"))
      assert.equal("chunked", res.headers["transfer-encoding"])
      assert.is_nil(res.headers["content-length"])
      assert.equal(expected, res:body())
      res = assert(c:get(ngx.base .. "/sub/text.txt?chunked=2"))
      local parts = {}
      for chunk in res:body_reader() do parts[#parts + 1] = chunk end
      assert.equal(expected, table.concat(parts))
      assert.equal(1, distinct_conns(logged("chunked=", 2)))
      c:close()
    end)
  end)

  -- 1,000 tasks, one GET each (tagged), through one client with `settings`; returns the
  -- number of connections nginx saw for them.
  local function thousand(tag, settings)
    local c = http.client(settings)
    local tasks = {}
    for i = 1, 1000 do
      tasks[i] = mw.spawn(function()
        local res, err = c:get(ngx.base .. "/ok?" .. tag .. "=" .. i)
        if not res then return "request failed: " .. tostring(err) end
        return res.status, res:body()
      end)
    end
    local failures = {}
    for i, t in ipairs(tasks) do
      local ok, status, body = t:join()
      if not (ok and status == 200 and body == "ok") then
        failures[#failures + 1] = ("#%d: %s %s %s"):format(i, tostring(ok), tostring(status), tostring(body))
      end
    end
    assert.same({}, failures)
    assert.equal(0, c:stats().active)
    c:close()
    return distinct_conns(logged(tag .. "=", 1000))
  end

  -- max_idle = 50 as well: with the default 32, connections coming back in a burst beyond
  -- 32 are closed even though requests wait for them, and how many nginx sees then depends
  -- on timing (http_client_spec.lua shows it deterministically against our server).
  it("1,000 concurrent requests, max_per_origin = 50 (max_idle = 50): all succeed, at most 50 connections", function()
    run(function()
      local n = thousand("many", { max_per_origin = 50, max_idle = 50 })
      assert.is_true(n >= 2, "the requests did not run concurrently")
      assert.is_true(n <= 50, "nginx saw " .. n .. " connections")
    end, 60)
  end)

  it("an idle connection nginx closed (keepalive_timeout) is replaced transparently", function()
    run(function()
      local c = http.client()
      assert.equal("short", assert(c:get(ngx.base .. "/short?idle=1")):body())
      assert.same({ idle = 1, active = 0 }, c:stats())
      mw.sleep(0.8) -- nginx closes it after 300 ms
      assert.equal("ok", assert(c:get(ngx.base .. "/ok?idle=2")):body())
      local log = logged("idle=", 2)
      assert.equal(2, distinct_conns(log))
      c:close()
    end)
  end)
end)
