-- HTTP/2 in a real browser: headless Chromium (Debian's /usr/bin/chromium) loads a page over
-- HTTPS from a moonwire server (h2 chosen by ALPN; the test certificate trusted through
-- --ignore-certificate-errors-spki-list, the SHA-256 of the server key's SubjectPublicKeyInfo),
-- and the page opens a wss:// WebSocket to the same server and exchanges a message. Chromium
-- opens that WebSocket on the page's HTTP/2 connection as an extended CONNECT (RFC 8441: the
-- server advertises SETTINGS_ENABLE_CONNECT_PROTOCOL; Chromium needs no flag for it).
-- Checked on both sides: the handler records version, method and :protocol of every request,
-- and the page writes what it saw (its own protocol, the echo) into the DOM, read back with
-- --dump-dom; a second run takes a screenshot (build/http2-browser.png).
-- The page cannot finish loading before the exchange is over: its last script (/after-ws.js)
-- is answered only once the WebSocket handler saw the page's close, which the page sends after
-- it wrote the echo into the DOM. So --dump-dom and --screenshot (taken after the load event)
-- see the result without any sleep.

local helper = require "spec.helper"
local procs = require "spec.peers.procs"
local mw = helper.mw
local http = require "moonwire.http"

local run, quote = helper.run, procs.quote
local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local MESSAGE = "hello from chromium"

local D      -- certificates (spec/fixtures/make-certs), made once for this file
local SPKI   -- base64 SHA-256 of server.key's public key (what Chromium is told to trust)

local PAGE = [[<!doctype html>
<html><head><meta charset="utf-8"><title>moonwire: HTTP/2 and WebSocket</title></head>
<body style="font: 20px sans-serif; margin: 40px">
<h1>moonwire over HTTP/2</h1>
<p>page loaded over: <b id="proto">?</b></p>
<p>WebSocket: <span id="url"></span></p>
<p>sent: <span id="sent"></span></p>
<p>received: <b id="echo">waiting</b></p>
<script>
const $ = (id) => document.getElementById(id);
$('proto').textContent = performance.getEntriesByType('navigation')[0].nextHopProtocol;
const ws = new WebSocket('wss://' + location.host + '/ws');
$('url').textContent = ws.url;
ws.onopen = () => { ws.send(']] .. MESSAGE .. [['); $('sent').textContent = ']] .. MESSAGE .. [['; };
ws.onmessage = (e) => { $('echo').textContent = e.data; ws.close(1000, 'done'); };
ws.onerror = () => { $('echo').textContent = 'websocket error'; };
</script>
<script src="/after-ws.js"></script>
</body></html>]]

local errors
-- The test server: the page, the WebSocket (echoes each message with what the server saw of
-- its request), /after-ws.js (held until the WebSocket closed). `seen` gets one record per
-- request; `closed` the WebSocket's close code.
local function serve(seen, closed)
  errors = {}
  return assert(http.server({
    host = "127.0.0.1", port = 0,
    tls = { cert = D .. "/server-chain.pem", key = D .. "/server.key" },
    error_log = function(msg) errors[#errors + 1] = msg end,
    handler = function(req, res)
      seen[#seen + 1] = { version = req.version, method = req.method, path = req.path, protocol = req.protocol,
        alpn = req.tls and req.tls.alpn }
      if req.path == "/" then
        res:header("content-type", "text/html; charset=utf-8")
        res:send(PAGE)
      elseif req.path == "/ws" then
        local ws = assert(req:websocket())
        for msg, kind in ws:messages() do
          ws:send(("echo: %s (server: HTTP/%s %s, :protocol %s)"):format(msg, req.version, req.method,
            tostring(req.protocol)), kind)
        end
        closed:send(ws.close_code or "none")
      elseif req.path == "/after-ws.js" then
        local code = closed:recv(20)
        res:header("content-type", "text/javascript")
        res:send("// the WebSocket closed with " .. tostring(code) .. "\n")
      else
        res:status(404)
        res:send("")
      end
    end }))
end

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

-- Runs headless Chromium on url with extra flags (a fresh profile, removed after); returns its
-- exit code, stdout and stderr.
local function chromium(url, flags)
  local profile = os.tmpname()
  os.remove(profile)
  local cmd = ("%s --headless --no-sandbox --disable-gpu --disable-quic --no-first-run " ..
    "--disable-background-networking --disable-component-update --disable-sync --no-proxy-server " ..
    "--disable-dev-shm-usage --user-data-dir=%s --ignore-certificate-errors-spki-list=%s %s %s")
    :format(procs.CHROMIUM, quote(profile), quote(SPKI), flags, quote(url))
  local code, out, err = procs.shell(cmd, 60)
  os.execute("rm -rf " .. quote(profile))
  return code, out, err
end

-- The requests the page made: every one over HTTP/2 (h2 by ALPN), the WebSocket an extended
-- CONNECT with :protocol websocket.
local function check_requests(seen)
  local by_path = {}
  for _, r in ipairs(seen) do
    assert.equal("2", r.version, ("%s %s came over HTTP/%s"):format(r.method, r.path, r.version))
    assert.equal("h2", r.alpn)
    by_path[r.path] = r
  end
  assert.same({ version = "2", method = "GET", path = "/", alpn = "h2" }, by_path["/"])
  assert.same({ version = "2", method = "CONNECT", path = "/ws", protocol = "websocket", alpn = "h2" },
    by_path["/ws"])
  assert.same({ version = "2", method = "GET", path = "/after-ws.js", alpn = "h2" }, by_path["/after-ws.js"])
end

local ECHO = ("echo: %s (server: HTTP/2 CONNECT, :protocol websocket)"):format(MESSAGE)

local function png_size(data)
  if not data or data:sub(1, 8) ~= "\137PNG\r\n\26\n" or data:sub(13, 16) ~= "IHDR" then return nil end
  return string.unpack(">I4I4", data, 17)
end

describe("HTTP/2 with headless Chromium:", function()
  setup(function()
    assert(procs.exists(procs.CHROMIUM),
      "Chromium is not installed (" .. procs.CHROMIUM .. "): run scripts/install-peers")
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute(("%s/fixtures/make-certs %s >/dev/null 2>&1"):format(SPEC_DIR, quote(dir))), "make-certs failed")
    D = dir
    local p = assert(io.popen(("openssl pkey -in %s -pubout -outform der | openssl dgst -sha256 -binary | base64")
      :format(quote(D .. "/server.key"))))
    SPKI = p:read("l")
    p:close()
    assert(SPKI and #SPKI == 44, "no SPKI hash of the server key")
  end)
  teardown(function() if D then os.execute("rm -rf " .. quote(D)) end end)

  it("the page comes over h2, its wss:// WebSocket as an extended CONNECT on the same connection, " ..
     "the echo lands in the DOM", function()
    run(function()
      local seen, closed = {}, mw.channel(1)
      local srv = serve(seen, closed)
      local _g <close> = guard(srv)
      local code, dom, err = chromium(("https://127.0.0.1:%d/"):format(srv.port), "--dump-dom")
      local context = ("\nchromium (exit %s) printed:\n%s\nstderr (end):\n%s")
        :format(tostring(code), dom, err:sub(-2000))
      assert.equal(0, code, context)
      -- the page's view: its navigation went over h2, the echo arrived
      assert.equal("h2", dom:match('<b id="proto">([^<]*)</b>'), context)
      assert.equal(("wss://127.0.0.1:%d/ws"):format(srv.port), dom:match('<span id="url">([^<]*)</span>'), context)
      assert.equal(MESSAGE, dom:match('<span id="sent">([^<]*)</span>'), context)
      assert.equal(ECHO, dom:match('<b id="echo">([^<]*)</b>'), context)
      -- the server's view
      check_requests(seen)
      -- the browser is gone: every connection it had ended
      assert.is_true(procs.wait_for(function() return srv:connections() == 0 end, 10),
        "connections left: " .. srv:connections())
      assert.same({}, errors)
    end, 90)
  end)

  it("a screenshot of the page after the exchange (build/http2-browser.png)", function()
    run(function()
      local seen, closed = {}, mw.channel(1)
      local srv = serve(seen, closed)
      local _g <close> = guard(srv)
      local shot = procs.root .. "/build/http2-browser.png"
      os.remove(shot)
      local code, out, err = chromium(("https://127.0.0.1:%d/"):format(srv.port),
        ("--screenshot=%s --window-size=800,400 --hide-scrollbars"):format(quote(shot)))
      assert.equal(0, code, ("chromium (exit %s): %s\n%s"):format(tostring(code), out, err:sub(-2000)))
      check_requests(seen)
      local data = procs.readfile(shot)
      assert.is_truthy(data, "no screenshot at " .. shot)
      local w, h = png_size(data)
      assert.is_truthy(w, "not a PNG: " .. shot)
      assert.same({ 800, 400 }, { w, h })
      assert.is_true(#data > 5000, "screenshot of only " .. #data .. " bytes")
      assert.is_true(procs.wait_for(function() return srv:connections() == 0 end, 10),
        "connections left: " .. srv:connections())
      assert.same({}, errors)
    end, 90)
  end)
end)
