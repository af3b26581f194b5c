-- TLS (docs/tls.md) against independent implementations:
--   curl (--cacert, mTLS with --cert, TLS versions, keep-alive, uploads/downloads, --compressed)
--     against our https server;
--   openssl s_client: TLS 1.0 and 1.1 refused by our server (the client is made able to speak
--     them with DEFAULT@SECLEVEL=0, and shown able to against an `openssl s_server` that
--     allows them), TLS 1.2 and 1.3 accepted, min_version = "1.3", ALPN, SNI, the chain sent,
--     session resumption (-sess_out / -sess_in shows "Reused") for TLS 1.2 and 1.3;
--   wss with python3-websockets (Debian's, /usr/bin/python3) and node's `ws`
--     (spec/peers/node_modules, installed by scripts/install-peers; missing = the test fails),
--     each way round: their client (trusting the test CA) against our server, our client
--     against their server (its certificate from the test CA);
--   certificate rotation by SIGHUP of a server started with http.serve in a child lua5.4.
-- The certificates come from spec/fixtures/make-certs, run once into a temporary directory.
-- Our servers listen on 127.0.0.1 port 0; external programs run in the background (under
-- `timeout`, so none outlives its limit) and are polled with mw.sleep in bounded loops.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local MAKE_CERTS = SPEC_DIR .. "/fixtures/make-certs"
local PYTHON = "/usr/bin/python3"
local NODE = "/usr/bin/node"
local CURL = "curl -q -sS --noproxy '*' --max-time 10"  -- -q: no ~/.curlrc
local S_CLIENT = "openssl s_client -connect 127.0.0.1:%d"
local LIMIT = 30

---------------------------------------------------------------------------------------------
-- fixtures

local readfile = helper.readfile

local writefile = helper.writefile

local function copyfile(from, to)
  return writefile(to, assert(readfile(from), "cannot read " .. from))
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- absolute path of the repository root (for node's require of spec/peers/node_modules/ws)
local function root_dir()
  local dir = SPEC_DIR:match("^(.*)/spec$") or (SPEC_DIR == "spec" and ".") or SPEC_DIR .. "/.."
  if dir:sub(1, 1) ~= "/" then
    local p = assert(io.popen("cd " .. quote(dir) .. " && pwd"))
    dir = p:read("l")
    p:close()
  end
  return dir
end
local ROOT = root_dir()
local NODE_WS = ROOT .. "/spec/peers/node_modules/ws"

local D   -- the certificate directory (setup / teardown of the top-level describe)
local function cert(name) return D .. "/" .. name end

local function make_certs()
  local dir = os.tmpname()
  os.remove(dir)
  local ok = os.execute(("%s %s >%s.log 2>&1"):format(MAKE_CERTS, dir, dir))
  local log = readfile(dir .. ".log") or ""
  os.remove(dir .. ".log")
  assert(ok, "spec/fixtures/make-certs failed: " .. log)
  D = dir
end

local function remove_certs()
  if D then os.execute("rm -rf " .. D) end
  D = nil
end

local function trusting(extra)
  local t = { cafile = cert("ca.pem") }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- Waits (bounded, from the loop) until cond() holds; returns whether it did.
local function wait_for(cond, limit)
  local deadline = mw.now() + (limit or 10)
  while not cond() do
    if mw.now() > deadline then return false end
    mw.sleep(0.01)
  end
  return true
end

local shell = helper.shell

-- A long-running program in the background (a server), under `timeout limit`; to-be-closed.
local Proc = {}
Proc.__index = Proc

function Proc:output() return (readfile(self.out) or "") .. (readfile(self.err) or "") end

function Proc:alive()
  local stat = readfile("/proc/" .. self.pid .. "/stat")
  if not stat then return false end
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= "Z" and state ~= "X"
end

-- Waits (bounded) until the program's stdout matches `pattern`; returns the captures.
function Proc:wait_for(pattern, limit)
  local caps
  local ok = wait_for(function()
    caps = table.pack((readfile(self.out) or ""):match(pattern))
    return caps[1] ~= nil or not self:alive()
  end, limit or 10)
  assert(ok and caps[1] ~= nil, ("%s: '%s' not seen (%s); output:\n%s"):format(self.name, pattern,
    ok and "it exited" or "timed out", self:output()))
  return table.unpack(caps, 1, caps.n)
end

function Proc:signal(sig)
  os.execute(("kill -%s %d 2>/dev/null"):format(sig, self.pid))
end

-- Ends it (SIGTERM) and waits a little for it to go (inside a task).
function Proc:stop()
  if self.stopped then return end
  self.stopped = true
  if self:alive() then self:signal("TERM") end
  if mw.current() then wait_for(function() return not self:alive() end, 3) end
  if self:alive() then self:signal("KILL") end
  os.remove(self.out)
  os.remove(self.err)
end
Proc.__close = Proc.stop

local function start(name, cmd, limit)
  local b = os.tmpname()
  local self = setmetatable({ name = name, out = b .. ".out", err = b .. ".err" }, Proc)
  local pidfile = b .. ".pid"
  -- a simple background command: $! is the pid of `timeout`, which passes signals on
  assert(os.execute(("timeout -k 2 %d %s >%s 2>%s </dev/null & echo $! >%s")
    :format(limit or 60, cmd, self.out, self.err, pidfile)))
  self.pid = assert(math.tointeger(tonumber(readfile(pidfile))), "no pid for " .. name)
  os.remove(pidfile)
  os.remove(b)
  return self
end

local temps = {}
local function script(source, suffix)
  local name = os.tmpname()
  os.remove(name)
  name = name .. suffix
  temps[#temps + 1] = name
  return writefile(name, source)
end

local function cleanup()
  for _, name in ipairs(temps) do os.remove(name) end
  temps = {}
end

local errors = {}

-- An https server on 127.0.0.1, port 0.
local function serve(tls, handler, opts)
  opts = opts or {}
  opts.host, opts.port, opts.tls = "127.0.0.1", 0, tls
  opts.handler = handler or function(_, res) res:send("ok") end
  errors = {}
  opts.error_log = opts.error_log or function(msg) errors[#errors + 1] = msg end
  return assert(http.server(opts))
end

local function server_tls(extra)
  local t = { cert = cert("server-chain.pem"), key = cert("server.key") }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

local function curl(srv, args, path)
  return shell(("%s --cacert %s %s https://127.0.0.1:%d%s"):format(CURL, cert("ca.pem"), args or "",
    srv.port, path or "/"))
end

-- openssl s_client against `port` with `args`; returns exit code and stdout+stderr.
local function s_client(port, args)
  local code, out, err = shell((S_CLIENT .. " %s"):format(port, args or ""), 15)
  return code, out .. err
end

-- "key=value" lines -> table
local function kv(text)
  local t = {}
  for line in (text or ""):gmatch("[^\n]+") do
    local k, v = line:match("^([%w_.]+)=(.*)$")
    if k then t[k] = v end
  end
  return t
end

local function need_node_ws()
  assert(exists(NODE), NODE .. " is missing: run scripts/install-peers (nodejs)")
  assert(exists(NODE_WS .. "/package.json"),
    "node's ws is not installed (" .. NODE_WS .. "): run scripts/install-peers")
end

local function need_python_websockets()
  assert(exists(PYTHON), PYTHON .. " is missing")
  local code, _, err = shell(PYTHON .. " -c 'import websockets'")
  assert(code == 0, "python3-websockets is missing for " .. PYTHON .. ": run scripts/install-peers; " .. err)
end

-- Our wss echo endpoint: echoes every message with its kind; records how each connection ended.
local function wss_echo_server()
  local seen = {}
  local srv = serve(server_tls(), function(req)
    local rec = { messages = 0, tls = req.tls.version }
    seen[#seen + 1] = rec
    local ws = assert(req:websocket())
    while true do
      local msg, kind, code, reason = ws:receive()
      if msg == nil then
        rec.ending = { kind, code, reason }
        break
      end
      rec.messages = rec.messages + 1
      assert(ws:send(msg, kind))
    end
    rec.done = true
  end)
  return srv, seen
end

-- The messages both sides of an echo exchange agree on: text (UTF-8), binary, empty, large.
local MESSAGES = {
  { "text", "héllo wörld ✓ 🌙" },
  { "binary", (function()
    local t = {}
    for i = 0, 255 do t[#t + 1] = string.char(i) end
    return table.concat(t):rep(4)
  end)() },
  { "text", "" },
  { "text", helper.pattern(512 * 1024) },
}

-- Our client's side of an exchange with a peer echo server.
local function our_wss_exchange(url)
  local ws = assert(mw.websocket.connect(url, { tls = trusting(), timeout = 10 }))
  for i, m in ipairs(MESSAGES) do
    assert(ws:send(m[2], m[1]))
    local got, kind = ws:receive(10)
    assert.equal(m[1], kind, "message " .. i)
    assert.is_true(got == m[2], "message " .. i .. " came back different")
  end
  ws:close(1000, "moonwire says bye")
  assert.equal("closed", ws.state)
  assert.equal(1000, ws.close_code)
end

---------------------------------------------------------------------------------------------
-- peers (written to temporary files)

local PY_CLIENT = [[
import asyncio, ssl, sys
import websockets

def pattern(n):
    parts, size, i = [], 0, 0
    while size < n:
        block = "%08x|abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV" % i
        parts.append(block)
        size += len(block)
        i += 1
    return "".join(parts)[:n]

MESSAGES = ["héllo wörld ✓ 🌙", bytes(range(256)) * 4, "", pattern(512 * 1024)]

async def main(url, cafile):
    ctx = ssl.create_default_context(cafile=cafile if cafile != "-" else None)
    try:
        ws = await websockets.connect(url, ssl=ctx, open_timeout=5, close_timeout=5,
                                      max_size=None, ping_interval=None)
    except ssl.SSLCertVerificationError as exc:
        print("verify_error=%s" % exc.verify_message, flush=True)
        return
    print("tls=%s" % ws.transport.get_extra_info("ssl_object").version(), flush=True)
    for i, msg in enumerate(MESSAGES):
        await ws.send(msg)
        got = await asyncio.wait_for(ws.recv(), 10)
        if got != msg or type(got) is not type(msg):
            raise AssertionError("message %d came back different" % i)
    print("echo=ok", flush=True)
    await ws.close(4000, "python says bye")
    print("close_code=%s" % ws.close_code, flush=True)

asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 20))
]]

local PY_SERVER = [[
import asyncio, ssl, sys
import websockets

async def handler(ws):
    try:
        async for msg in ws:
            await ws.send(msg)
    except websockets.ConnectionClosed:
        pass
    print("closed code=%s reason=%s tls=%s" % (ws.close_code, ws.close_reason,
          ws.transport.get_extra_info("ssl_object").version()), flush=True)

async def main(chain, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile=chain, keyfile=key)
    async with websockets.serve(handler, "127.0.0.1", 0, ssl=ctx, max_size=None,
                                ping_interval=None) as server:
        print("port=%d" % server.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], sys.argv[2]))
]]

local NODE_CLIENT = [[
'use strict';
const fs = require('fs');
const WebSocket = require(process.argv[2]);
const url = process.argv[3];
const ca = process.argv[4] === '-' ? undefined : fs.readFileSync(process.argv[4]);
function pattern(n) {
  const parts = [];
  let size = 0;
  for (let i = 0; size < n; i++) {
    const b = i.toString(16).padStart(8, '0') + '|abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV';
    parts.push(b);
    size += b.length;
  }
  return parts.join('').slice(0, n);
}
const messages = ['héllo wörld ✓ 🌙', Buffer.from(Array.from({ length: 1024 }, (_, i) => i % 256)), '',
  pattern(512 * 1024)];
const watchdog = setTimeout(() => { console.log('error=timed out'); process.exit(1); }, 20000);
const ws = new WebSocket(url, { ca, handshakeTimeout: 5000, maxPayload: 0, perMessageDeflate: false });
let i = 0;
const sendNext = () => {
  const m = messages[i];
  ws.send(m, { binary: Buffer.isBuffer(m) });
};
ws.on('error', (e) => { console.log('error_code=' + e.code); console.log('error=' + e.message); process.exit(0); });
ws.on('open', () => { console.log('tls=' + ws._socket.getProtocol()); sendNext(); });
ws.on('message', (data, isBinary) => {
  const m = messages[i];
  const same = Buffer.isBuffer(m) ? isBinary && Buffer.compare(data, m) === 0 : !isBinary && data.toString() === m;
  if (!same) { console.log('error=message ' + i + ' came back different'); process.exit(1); }
  i++;
  if (i < messages.length) return sendNext();
  console.log('echo=ok');
  ws.close(4000, 'node says bye');
});
ws.on('close', (code) => { console.log('close_code=' + code); clearTimeout(watchdog); });
]]

local NODE_SERVER = [[
'use strict';
const fs = require('fs');
const https = require('https');
const { WebSocketServer } = require(process.argv[2]);
const server = https.createServer({ cert: fs.readFileSync(process.argv[3]), key: fs.readFileSync(process.argv[4]) });
const wss = new WebSocketServer({ server, maxPayload: 0, perMessageDeflate: false });
wss.on('connection', (ws, req) => {
  const proto = req.socket.getProtocol();
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('close', (code, reason) => console.log(`closed code=${code} reason=${reason} tls=${proto}`));
});
server.listen(0, '127.0.0.1', () => console.log('port=' + server.address().port));
setTimeout(() => process.exit(0), 60000).unref();
setInterval(() => {}, 1 << 30);
]]

-- A server in a child lua5.4 with http.serve (SIGHUP re-reads the certificate files).
local LUA_SERVE = [[
local http = require "moonwire.http"
local chain, key, portfile = arg[1], arg[2], arg[3]
http.serve {
  host = "127.0.0.1", port = 0,
  tls = { cert = chain, key = key },
  timeouts = { idle = 30 },
  handler = function(req, res) res:send("path " .. req.path) end,
  on_listen = function(srv)
    local stat = assert(io.open("/proc/self/stat"))
    local pid = stat:read("n")
    stat:close()
    local f = assert(io.open(portfile .. ".tmp", "w"))
    f:write(("%d %d"):format(srv.port, pid))
    f:close()
    assert(os.rename(portfile .. ".tmp", portfile))
  end,
}
print("stopped cleanly")
]]

local function lua_env()
  local preload = os.getenv("MW_ASAN_PRELOAD")
  return ("env LUA_PATH=%s LUA_CPATH=%s%s"):format(quote(package.path), quote(package.cpath),
    preload and (" LD_PRELOAD=" .. quote(preload)) or "")
end

---------------------------------------------------------------------------------------------

describe("tls interop", function()
  setup(make_certs)
  teardown(remove_certs)
  after_each(cleanup)

  describe("curl", function()
    it("GETs from our https server with --cacert (through the intermediate)", function()
      run(function()
        local seen = {}
        local srv = serve(server_tls(), function(req, res)
          seen[#seen + 1] = req.tls
          res:send("hello over " .. req.tls.version)
        end)
        local _ <close> = guard(srv)
        local code, out, err = curl(srv, "-w '\\n%{http_code} %{ssl_verify_result} %{http_version}'")
        assert.equal(0, code, err)
        local body, status, verify, version = out:match("^(.-)\n(%d+) (%d+) (%S+)$")
        assert.equal("200", status)
        assert.equal("0", verify)
        assert.equal("2", version)      -- curl offers h2 by ALPN, and the server prefers it
        assert.matches("^hello over TLSv1%.[23]$", body)
        -- by name (the certificate's DNS:localhost), SNI sent
        code, out, err = shell(("%s --cacert %s --resolve localhost:%d:127.0.0.1 https://localhost:%d/")
          :format(CURL, cert("ca.pem"), srv.port, srv.port))
        assert.equal(0, code, err)
        assert.matches("^hello over TLSv1%.[23]$", out)
        assert.equal(2, #seen)
        assert.equal("localhost", seen[2].sni)
        assert.equal("h2", seen[2].alpn)   -- curl offers ALPN (h2, http/1.1)
      end)
    end)

    it("refuses our server without the test CA (curl's system store), and a wrong name", function()
      run(function()
        local handled = false
        local srv = serve(server_tls(), function(_, res) handled = true res:send("no") end)
        local _ <close> = guard(srv)
        local code, _, err = shell(("%s https://127.0.0.1:%d/"):format(CURL, srv.port))
        assert.equal(60, code, err)   -- CURLE_PEER_FAILED_VERIFICATION
        code, _, err = shell(("%s --cacert %s --resolve wrong.test:%d:127.0.0.1 https://wrong.test:%d/")
          :format(CURL, cert("ca.pem"), srv.port, srv.port))
        assert.equal(60, code, err)
        assert.is_false(handled)
      end)
    end)

    it("speaks TLS 1.2 and TLS 1.3 with curl", function()
      run(function()
        local srv = serve(server_tls(), function(req, res) res:send(req.tls.version) end)
        local _ <close> = guard(srv)
        local code, out, err = curl(srv, "--tls-max 1.2")
        assert.equal(0, code, err)
        assert.equal("TLSv1.2", out)
        code, out, err = curl(srv, "--tlsv1.3")
        assert.equal(0, code, err)
        assert.equal("TLSv1.3", out)
      end)
    end)

    it("keeps the TLS connection alive across requests", function()
      run(function()
        local ports = {}
        local srv = serve(server_tls(), function(req, res)
          ports[#ports + 1] = req.remote_port
          res:send(req.path .. "\n")
        end)
        local _ <close> = guard(srv)
        local u = ("https://127.0.0.1:%d"):format(srv.port)
        local code, out, err = shell(("%s -v --cacert %s %s/a %s/b %s/c"):format(CURL, cert("ca.pem"), u, u, u))
        assert.equal(0, code, err)
        assert.equal("/a\n/b\n/c\n", out)
        assert.equal(3, #ports)
        assert.equal(ports[1], ports[2])
        assert.equal(ports[1], ports[3])
        assert.matches("Re%-using existing connection", err)
      end)
    end)

    it("uploads and downloads megabytes (sendfile through TLS), and --compressed", function()
      run(function()
        local size = 3 * 1024 * 1024 + 5
        local data = helper.pattern(size)
        local file = writefile(cert("big.bin"), data)
        local text = ("compressible line over TLS\n"):rep(4000)
        local srv = serve(server_tls(), function(req, res)
          if req.method == "POST" then
            local body = assert(req:body())
            res:send(("%d %s"):format(#body, tostring(body == data)))
          elseif req.path == "/text" then
            res:header("content-type", "text/plain")
            res:send(text)
          else
            res:sendfile(file)
          end
        end, { limits = { body = 8 * 1024 * 1024 } })
        local _ <close> = guard(srv)
        local got = cert("got.bin")
        local code, _, err = curl(srv, "-o " .. got, "/big.bin")
        assert.equal(0, code, err)
        local back = readfile(got)
        assert.equal(size, #back)
        assert.is_true(back == data, "the downloaded bytes differ")
        local out
        code, out, err = curl(srv, "--data-binary @" .. file .. " -H 'content-type: application/octet-stream'", "/up")
        assert.equal(0, code, err)
        assert.equal(size .. " true", out)
        code, out, err = curl(srv, "--compressed -D " .. cert("headers.txt"), "/text")
        assert.equal(0, code, err)
        assert.equal(text, out)
        assert.matches("[Cc]ontent%-[Ee]ncoding: gzip", readfile(cert("headers.txt")))
        os.remove(got)
        os.remove(file)
      end)
    end)

    it("mTLS: a client certificate from the CA is accepted, none or a foreign one refused", function()
      run(function()
        local seen = {}
        local srv = serve(server_tls { cafile = cert("ca.pem"), verify_client = true }, function(req, res)
          seen[#seen + 1] = req.tls
          res:send(("%s %s"):format(req.tls.peer_subject, tostring(req.tls.peer_verified)))
        end)
        local _ <close> = guard(srv)
        local code, out, err = curl(srv, ("--cert %s --key %s"):format(cert("client.pem"), cert("client.key")))
        assert.equal(0, code, err)
        assert.equal("/O=moonwire tests/CN=moonwire test client true", out)
        for _, tls12 in ipairs { "", "--tls-max 1.2" } do
          -- (curl reports it as a failed handshake, or as a failed read just after it in TLS 1.3)
          code, _, err = curl(srv, tls12)
          assert.not_equal(0, code, "no client certificate " .. tls12 .. ": " .. err)
          code, _, err = curl(srv, ("%s --cert %s --key %s"):format(tls12, cert("client-unknown.pem"),
            cert("client-unknown.key")))
          assert.not_equal(0, code, "a foreign client certificate " .. tls12 .. ": " .. err)
        end
        assert.equal(1, #seen)
      end)
    end)
  end)

  describe("openssl s_client", function()
    it("TLS 1.0 and 1.1 are refused by our server (which s_client can speak)", function()
      run(function()
        local srv = serve(server_tls())
        local _ <close> = guard(srv)
        -- the control: this s_client negotiates TLS 1.0/1.1 with a server that allows them
        for _, v in ipairs { { "-tls1", "TLSv1" }, { "-tls1_1", "TLSv1.1" } } do
          local port = helper.free_port()
          local ctl <close> = start("openssl s_server " .. v[1], ("openssl s_server -accept 127.0.0.1:%d "
            .. "-cert %s -key %s %s -cipher 'DEFAULT@SECLEVEL=0' -naccept 1 -www")
            :format(port, cert("server.pem"), cert("server.key"), v[1]), 20)
          ctl:wait_for("ACCEPT")
          local code, out = s_client(port, v[1] .. " -cipher 'DEFAULT@SECLEVEL=0'")
          assert.equal(0, code, out)
          assert.matches("Protocol%s*: " .. v[2]:gsub("%.", "%%.") .. "\n", out)
          assert.matches("Cipher is [%w-]+", out)
          -- our server: the handshake fails, with the server's protocol_version alert (70)
          code, out = s_client(srv.port, v[1] .. " -cipher 'DEFAULT@SECLEVEL=0'")
          assert.not_equal(0, code, out)
          assert.matches("alert protocol version", out)
          assert.matches("Cipher is %(NONE%)", out)
        end
        -- the server is fine afterwards
        local code, out = s_client(srv.port, "-CAfile " .. cert("ca.pem"))
        assert.equal(0, code, out)
      end)
    end)

    it("TLS 1.2 and 1.3 are accepted; the chain verifies", function()
      run(function()
        local srv = serve(server_tls())
        local _ <close> = guard(srv)
        for _, v in ipairs { { "-tls1_2", "TLSv1.2" }, { "-tls1_3", "TLSv1.3" } } do
          local code, out = s_client(srv.port, v[1] .. " -verify_return_error -CAfile " .. cert("ca.pem"))
          assert.equal(0, code, out)
          assert.matches("New, " .. v[2]:gsub("%.", "%%.") .. ", Cipher is [%w_-]+", out)
          assert.matches("Verify return code: 0 %(ok%)", out)
          -- the intermediate is sent: depth 1 is the intermediate CA
          assert.matches("depth=1 O = moonwire tests, CN = moonwire test intermediate CA", out, 1, true)
        end
      end)
    end)

    it("min_version = \"1.3\": TLS 1.2 refused, 1.3 accepted", function()
      run(function()
        local srv = serve(server_tls { min_version = "1.3" })
        local _ <close> = guard(srv)
        local code, out = s_client(srv.port, "-tls1_2")
        assert.not_equal(0, code, out)
        assert.matches("alert protocol version", out)
        code, out = s_client(srv.port, "-tls1_3")
        assert.equal(0, code, out)
        assert.matches("New, TLSv1%.3", out)
      end)
    end)

    it("ciphersuites: the server's TLS 1.3 suites, in its order; a client offering none of them is refused", function()
      run(function()
        local srv = serve(server_tls { ciphersuites = "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256" })
        local _ <close> = guard(srv)
        -- the client prefers AES-128 first; the server's order wins
        local code, out = s_client(srv.port,
          "-tls1_3 -ciphersuites TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256")
        assert.equal(0, code, out)
        assert.matches("New, TLSv1.3, Cipher is TLS_CHACHA20_POLY1305_SHA256", out, 1, true)
        code, out = s_client(srv.port, "-tls1_3 -ciphersuites TLS_AES_128_GCM_SHA256")
        assert.equal(0, code, out)
        assert.matches("Cipher is TLS_AES_128_GCM_SHA256", out, 1, true)
        code, out = s_client(srv.port, "-tls1_3 -ciphersuites TLS_AES_256_GCM_SHA384")
        assert.not_equal(0, code, out)
        assert.matches("alert handshake failure", out, 1, true)
      end)
    end)

    it("ALPN: h2 is preferred, http/1.1 for clients without it", function()
      run(function()
        local srv = serve(server_tls())
        local _ <close> = guard(srv)
        local code, out = s_client(srv.port, "-alpn http/1.1,h2")
        assert.equal(0, code, out)
        assert.matches("ALPN protocol: h2", out, 1, true)
        code, out = s_client(srv.port, "-alpn http/1.1")
        assert.equal(0, code, out)
        assert.matches("ALPN protocol: http/1.1", out, 1, true)
      end)
    end)

    it("ALPN with http2 = false: http/1.1 is chosen; h2 is not", function()
      run(function()
        local srv = serve(server_tls(), nil, { http2 = false })
        local _ <close> = guard(srv)
        local code, out = s_client(srv.port, "-alpn http/1.1")
        assert.equal(0, code, out)
        assert.matches("ALPN protocol: http/1.1", out, 1, true)
        code, out = s_client(srv.port, "-alpn h2,http/1.1")
        assert.equal(0, code, out)
        assert.matches("ALPN protocol: http/1.1", out, 1, true)
        code, out = s_client(srv.port, "-alpn h2")
        assert.equal(0, code, out)
        assert.matches("No ALPN negotiated", out, 1, true)
      end)
    end)

    it("SNI: -servername other.test gets the other.test certificate", function()
      run(function()
        local srv = serve(server_tls { sni = { ["other.test"] = { cert = cert("other-chain.pem"),
          key = cert("other.key") } } })
        local _ <close> = guard(srv)
        local code, out = s_client(srv.port, "-servername other.test -verify_return_error -CAfile " .. cert("ca.pem"))
        assert.equal(0, code, out)
        assert.matches("subject=O = moonwire tests, CN = other.test", out, 1, true)
        code, out = s_client(srv.port, "-noservername")
        assert.equal(0, code, out)
        assert.matches("subject=O = moonwire tests, CN = localhost\n", out, 1, true)
        code, out = s_client(srv.port, "-servername nobody.test")
        assert.equal(0, code, out)
        assert.matches("subject=O = moonwire tests, CN = localhost\n", out, 1, true)
      end)
    end)

    -- s_client sends a request and reads until the server closes (-ign_eof): a TLS 1.3
    -- server's session tickets come after the handshake, before the response
    local function s_client_get(port, args)
      local request = "printf 'GET / HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' | "
      local code, out, err = shell(request .. (S_CLIENT .. " -ign_eof %s"):format(port, args or ""), 15)
      return code, out .. err
    end

    it("resumes sessions: -sess_out then -sess_in shows \"Reused\" (TLS 1.2 and 1.3)", function()
      run(function()
        local resumed, seen = {}, {}
        local srv = serve(server_tls(), function(req, res)
          seen[#seen + 1] = req.tls.version .. (req.tls.resumed and " resumed" or " new")
          res:send("ok")
        end)
        local _ <close> = guard(srv)
        for _, v in ipairs { "-tls1_2", "-tls1_3" } do
          local sess = cert("session" .. v)
          -- (the exit status is not looked at here: see the close_notify test)
          local _, out = s_client_get(srv.port, v .. " -sess_out " .. sess)
          assert.matches("\nNew, TLSv1%.[23]", out)
          assert.matches("HTTP/1.1 200 OK", out, 1, true)
          assert.is_true(exists(sess), "no session was saved")
          _, out = s_client_get(srv.port, v .. " -sess_in " .. sess)
          assert.matches("HTTP/1.1 200 OK", out, 1, true)
          resumed[#resumed + 1] = out:match("\n(Reused), TLSv1%.[23]") or out:match("\n(New), ") or out
        end
        assert.same({ "Reused", "Reused" }, resumed)
        -- the server side knows too (req.tls.resumed)
        assert.same({ "TLSv1.2 new", "TLSv1.2 resumed", "TLSv1.3 new", "TLSv1.3 resumed" }, seen)
      end)
    end)

    it("our server ends a Connection: close response with close_notify (no unexpected EOF)", function()
      run(function()
        local srv = serve(server_tls())
        local _ <close> = guard(srv)
        for _, v in ipairs { "-tls1_2", "-tls1_3" } do
          local code, out = s_client_get(srv.port, v)
          assert.matches("HTTP/1.1 200 OK", out, 1, true)
          assert.is_nil(out:find("unexpected eof", 1, true), v .. ": the server closed without close_notify "
            .. "(s_client: " .. tostring(out:match("[^\n]*unexpected eof[^\n]*")) .. ")")
          assert.equal(0, code, out)
        end
      end)
    end)
  end)

  -- RFC 8446 §6.1: a side that is done writing sends close_notify; the other half stays
  -- open. Python's ssl reads a stream cut without it as an error (SSLEOFError).
  describe("half-close with Python's ssl", function()
    it("s:shutdown('write') sends close_notify; the peer's answer still comes back", function()
      run(function()
        local py = script(([[
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)   # (Debian's Python sets it)
ctx.load_cert_chain(%q, %q)
l = socket.create_server(("127.0.0.1", 0))
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
s = ctx.wrap_socket(c, server_side=True, suppress_ragged_eofs=False)
got = b""
try:
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += d
    s.sendall(b"got %%d bytes, then close_notify" %% len(got))
except ssl.SSLEOFError as e:
    print("SSLEOFError", e, flush=True)
s.close()
]]):format(cert("server-chain.pem"), cert("server.key")), ".py")
        local p <close> = start("python ssl", PYTHON .. " " .. py, 20)
        local port = math.tointeger(tonumber(p:wait_for("^(%d+)\n")))
        local s = assert(mw.tcp.connect("127.0.0.1", port, { tls = trusting(), timeout = 5 }))
        assert(s:write("hello"))
        assert(s:shutdown("write"))
        assert.equal("got 5 bytes, then close_notify", s:read("a"))
        s:close()
        assert.not_matches("SSLEOFError", p:output())
      end)
    end)
  end)

  describe("wss with python3-websockets", function()
    it("python's client (ssl context with the test CA) against our wss server", function()
      run(function()
        need_python_websockets()
        local srv, seen = wss_echo_server()
        local _ <close> = guard(srv)
        local client = script(PY_CLIENT, ".py")
        local code, out, err = shell(("%s %s wss://localhost:%d/echo %s"):format(PYTHON, client, srv.port,
          cert("ca.pem")), LIMIT)
        assert.equal(0, code, out .. err)
        local r = kv(out)
        assert.equal("ok", r.echo, out .. err)
        assert.matches("^TLSv1%.[23]$", r.tls)
        assert.equal("4000", r.close_code)
        assert(wait_for(function() return seen[1] and seen[1].done end, 5), "our handler did not end")
        assert.equal(#MESSAGES, seen[1].messages)
        assert.same({ "closed", 4000, "python says bye" }, seen[1].ending)
        -- without the test CA, python refuses us
        code, out, err = shell(("%s %s wss://localhost:%d/echo -"):format(PYTHON, client, srv.port), LIMIT)
        assert.equal(0, code, out .. err)
        assert.matches("unable to get local issuer certificate", kv(out).verify_error or out .. err)
        assert.same({}, errors)
      end, LIMIT + 10)
    end)

    it("our wss client against python's server (certfile from the test CA)", function()
      run(function()
        need_python_websockets()
        local server <close> = start("python wss server", ("%s %s %s %s"):format(PYTHON, script(PY_SERVER, ".py"),
          cert("server-chain.pem"), cert("server.key")), LIMIT + 30)
        local port = math.tointeger(tonumber(server:wait_for("port=(%d+)")))
        our_wss_exchange(("wss://127.0.0.1:%d/echo"):format(port))
        local code, reason, version = server:wait_for("closed code=(%d+) reason=([^\n]-) tls=(%S+)\n")
        assert.equal("1000", code)
        assert.equal("moonwire says bye", reason)
        assert.matches("^TLSv1%.[23]$", version)
        -- without the test CA we refuse it
        local ok, err, ecode = mw.websocket.connect(("wss://127.0.0.1:%d/echo"):format(port), { timeout = 5 })
        assert.is_nil(ok)
        assert.equal("tls", ecode)
        assert.matches("certificate verify failed", err)
      end, LIMIT + 10)
    end)
  end)

  describe("wss with node's ws", function()
    it("node's client (ca = the test CA) against our wss server", function()
      need_node_ws()
      run(function()
        local srv, seen = wss_echo_server()
        local _ <close> = guard(srv)
        local client = script(NODE_CLIENT, ".js")
        local code, out, err = shell(("%s %s %s wss://localhost:%d/echo %s"):format(NODE, client, NODE_WS,
          srv.port, cert("ca.pem")), LIMIT)
        assert.equal(0, code, out .. err)
        local r = kv(out)
        assert.equal("ok", r.echo, out .. err)
        assert.matches("^TLSv1%.[23]$", r.tls)
        assert.equal("4000", r.close_code)
        assert(wait_for(function() return seen[1] and seen[1].done end, 5), "our handler did not end")
        assert.equal(#MESSAGES, seen[1].messages)
        assert.same({ "closed", 4000, "node says bye" }, seen[1].ending)
        -- without the test CA, node refuses us
        code, out, err = shell(("%s %s %s wss://localhost:%d/echo -"):format(NODE, client, NODE_WS, srv.port), LIMIT)
        assert.equal(0, code, out .. err)
        assert.equal("UNABLE_TO_GET_ISSUER_CERT_LOCALLY", kv(out).error_code, out .. err)
        assert.same({}, errors)
      end, LIMIT + 10)
    end)

    it("our wss client against node's server (https.createServer with the test certificate)", function()
      need_node_ws()
      run(function()
        local server <close> = start("node wss server", ("%s %s %s %s %s"):format(NODE, script(NODE_SERVER, ".js"),
          NODE_WS, cert("server-chain.pem"), cert("server.key")), LIMIT + 30)
        local port = math.tointeger(tonumber(server:wait_for("port=(%d+)")))
        our_wss_exchange(("wss://127.0.0.1:%d/echo"):format(port))
        local code, reason, version = server:wait_for("closed code=(%d+) reason=([^\n]-) tls=(%S+)\n")
        assert.equal("1000", code)
        assert.equal("moonwire says bye", reason)
        assert.matches("^TLSv1%.[23]$", version)
        local ok, _, ecode = mw.websocket.connect(("wss://127.0.0.1:%d/echo"):format(port), { timeout = 5 })
        assert.is_nil(ok)
        assert.equal("tls", ecode)
      end, LIMIT + 10)
    end)
  end)

  describe("certificate rotation", function()
    it("SIGHUP to http.serve re-reads the files: new connections get the new certificate, "
      .. "an open keep-alive connection goes on", function()
      run(function()
        local chain, key = cert("hup-chain.pem"), cert("hup.key")
        copyfile(cert("server-chain.pem"), chain)
        copyfile(cert("server.key"), key)
        local portfile = cert("hup.port")
        local proc <close> = start("lua5.4 http.serve", ("%s lua5.4 %s %s %s %s"):format(lua_env(),
          script(LUA_SERVE, ".lua"), chain, key, portfile), LIMIT + 10)
        assert(wait_for(function() return exists(portfile) or not proc:alive() end, 10) and exists(portfile),
          "the server did not start: " .. proc:output())
        -- its own pid: `timeout` would pass a HUP on, but then kill it 2 s later (-k)
        local port, pid = readfile(portfile):match("^(%d+) (%d+)$")
        port = math.tointeger(tonumber(port))
        local function hup() os.execute("kill -HUP " .. pid) end
        local function subject()
          local s = assert(mw.tcp.connect("127.0.0.1", port, { tls = trusting(), timeout = 5 }))
          local subj = s:tls_info().peer_subject
          s:close()
          return subj
        end
        local function get(s, path)
          assert(s:write(("GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n"):format(path)))
          local line = assert(s:read("l", 5))
          local n = 0
          while true do
            local h = assert(s:read("l", 5))
            if h == "" then break end
            n = tonumber(h:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")) or n
          end
          return line, n > 0 and assert(s:read(n, 5)) or ""
        end
        assert.equal("/O=moonwire tests/CN=localhost", subject())
        local old = assert(mw.tcp.connect("127.0.0.1", port, { tls = trusting(), timeout = 5 }))
        local line, body = get(old, "/before")
        assert.equal("HTTP/1.1 200 OK", line)
        assert.equal("path /before", body)
        copyfile(cert("server2-chain.pem"), chain)
        copyfile(cert("server2.key"), key)
        hup()
        -- the signal is handled by the child's loop: poll (bounded) for the new certificate
        local now
        assert(wait_for(function()
          now = subject()
          return now ~= "/O=moonwire tests/CN=localhost"
        end, 10), "the certificate did not change after SIGHUP")
        assert.equal("/O=moonwire tests/CN=moonwire test server 2", now)
        line, body = get(old, "/after")
        assert.equal("HTTP/1.1 200 OK", line)
        assert.equal("path /after", body)
        assert.equal("/O=moonwire tests/CN=localhost", old:tls_info().peer_subject)
        old:close()
        -- SIGTERM: a graceful stop
        os.execute("kill -TERM " .. pid)
        assert(wait_for(function() return not proc:alive() end, 10), "the server did not stop")
        assert.matches("stopped cleanly", proc:output())
        -- (under ASan the child runs with the sanitizer too: it must have nothing to report)
        assert.is_nil(proc:output():find("Sanitizer", 1, true), proc:output())
      end, LIMIT)
    end)
  end)
end)
