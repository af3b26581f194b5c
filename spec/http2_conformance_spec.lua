-- HTTP/2 conformance and abuse (spec/peers/h2check.py: raw frames from python3-h2's
-- hyperframe and hpack, cases modelled on h2spec's groups plus moonwire's abuse limits)
-- against moonwire's server, cleartext and TLS. Every case must pass except the two where
-- libnghttp2 itself is less strict than RFC 9113 (shared/notes/http2.md): a HEADERS with a
-- lower stream id is ignored instead of a connection error (§5.1.1), and an
-- INITIAL_WINDOW_SIZE that overflows an open stream's window gets RST_STREAM instead of a
-- connection error (§6.9.2).
local helper = require "spec.helper"
local mw = helper.mw
local http = require "moonwire.http"

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local H2CHECK = "/usr/bin/python3 " .. SPEC_DIR .. "/peers/h2check.py"
local KNOWN = { ["http2/5.1.1/2"] = true, ["http2/6.9.2/3"] = true }

-- the routes h2check expects (spec/peers/h2check_README.md)
local function app()
  local started, running = 0, 0
  local r = http.router()
  r:get("/", function(_, res) res:send("hello") end)
  r:post("/echo", function(req, res) res:send(assert(req:body())) end)
  r:get("/slow", function(_, res)
    -- a handler busy for 2 s that does not stop when its stream is reset (as a CPU- or
    -- database-bound one would not): it must still count against MAX_CONCURRENT_STREAMS
    started, running = started + 1, running + 1
    local t = mw.now() + 2
    while mw.now() < t do mw.sleep(0.05) end
    running = running - 1
    res:send("slow")
  end)
  r:get("/big", function(req, res) res:send(("x"):rep(tonumber(req:query().n) or 1000)) end)
  r:get("/trailers", function(_, res)
    res:trailer("x-checksum", "abc")
    res:write("body")
    res:finish()
  end)
  r:get("/stats", function(_, res)
    res:header("content-type", "application/json")
    res:send(('{"handlers_started":%d,"handlers_running":%d}'):format(started, running))
  end)
  return r
end

local function check(args, limit)
  local code, out, err = helper.shell(H2CHECK .. " " .. args, limit)
  local failed = {}
  for id, why in out:gmatch("\nFAIL (%S+) ([^\n]*)") do
    if not KNOWN[id] then failed[#failed + 1] = id .. " " .. why end
  end
  local passed = tonumber(out:match("(%d+) passed, %d+ failed"))
  assert.is_not_nil(passed, "h2check printed no summary: " .. out .. err)
  assert.same({}, failed)
  assert.is_true(code == 0 or code == 1, err)
  return passed
end

describe("HTTP/2 conformance (h2check)", function()
  it("cleartext: every generic, http2, hpack and abuse case", function()
    helper.run(function()
      local srv = assert(http.server { host = "127.0.0.1", port = 0, handler = app(),
        timeouts = { head = 1, idle = 1 }, limits = { body = 16 * 1024 * 1024 }, error_log = function() end })
      local passed = check(("127.0.0.1 %d --timeout-scale 1"):format(srv.port), 300)
      assert.is_true(passed >= 195, passed .. " passed")
      srv:close(0)
    end, 320)
  end)

  it("TLS (h2 by ALPN): every generic, http2 and hpack case", function()
    helper.run(function()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute(("%s/fixtures/make-certs %s >/dev/null 2>&1"):format(SPEC_DIR, dir)))
      local srv = assert(http.server { host = "127.0.0.1", port = 0, handler = app(),
        tls = { cert = dir .. "/server-chain.pem", key = dir .. "/server.key" },
        timeouts = { head = 1, idle = 1 }, error_log = function() end })
      local passed = check(("127.0.0.1 %d --tls --no-abuse --timeout-scale 1"):format(srv.port), 300)
      assert.is_true(passed >= 175, passed .. " passed")
      srv:close(0)
      os.execute("rm -rf " .. dir)
    end, 320)
  end)
end)
