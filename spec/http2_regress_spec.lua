-- Regressions found by fuzzing HTTP/2 (fuzz/h2_frames.c) and the review around it; each test
-- failed before its fix.
-- 1. A connection error (nghttp2's GOAWAY after a frame breaking a rule) while a handler ran:
--    the connection's task waited for the handlers as after a graceful shutdown, reading
--    nothing, so a handler in req:body() or res:write() waited for its body or write timeout
--    and the connection stayed open as long. Now only Server:close()'s own GOAWAY waits for
--    in-flight handlers; a connection error ends at once and the handlers are cancelled.
-- 2. res:status(204) then res:write(...): the body went out after a status that has none
--    (HTTP/2: DATA after the 204, the client resets the stream; HTTP/1.1: chunked bytes in
--    front of the next response). Now what is written after a bodyless status is dropped.
-- 3. Request bodies a handler never read were never given back to the connection's
--    flow-control window: after conn_window bytes of unread uploads (a 401 or 413 answered
--    before reading) no upload could go on. Now a handler's end gives back what it left unread,
--    and DATA arriving after it is given back at once.
local helper = require "spec.helper"
local mw = helper.mw
local http = require "moonwire.http"

-- client preface, SETTINGS, then HEADERS(stream 1, END_HEADERS, :method given) [+ DATA], then a
-- frame header of length 65540 (> SETTINGS_MAX_FRAME_SIZE): a connection error (FRAME_SIZE_ERROR)
local PREFACE = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" .. "\0\0\0\4\0\0\0\0\0"
local function headers(method, end_stream)   -- HPACK: static-table :method, :scheme http, :path /, :authority x
  local block = (method == "GET" and "\x82" or "\x83") .. "\x86\x84\x41\x01x"
  return string.pack(">I3BBI4", #block, 1, 4 | (end_stream and 1 or 0), 1) .. block
end
local BAD = "\1\0\4\0\0\0\0\0\1" .. ("x"):rep(20)

local function attempt(bytes, handler, timeouts)
  local srv = assert(http.server { host = "127.0.0.1", port = 0, timeouts = timeouts, handler = handler })
  local t0 = mw.now()
  local c = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
  assert(c:write(bytes))
  repeat local d = c:recv(65536, 10) until not d
  c:close()
  local took = mw.now() - t0
  srv:close(0)
  return took
end

describe("HTTP/2 connection error while a handler runs", function()
  it("a handler reading the body gets an error at once, the connection closes at once", function()
    helper.run(function()
      local got
      local took = attempt(PREFACE .. headers("POST", false) .. string.pack(">I3BBI4", 7, 0, 0, 1) .. "partial" .. BAD,
        function(req, res) got = select(2, req:body()) res:send("x") end, { body = 3 })
      assert.is_true(took < 1, ("the connection stayed %.2f s"):format(took))   -- 3.00 s on main
      assert.is_not_equal("request body timeout", got)
    end, 15)
  end)
  it("a handler streaming a response gets an error at once, the connection closes at once", function()
    helper.run(function()
      local took = attempt(PREFACE .. headers("GET", true) .. BAD, function(_, res)
        for _ = 1, 100 do if not res:write(("x"):rep(16384)) then return end end
      end, { write = 3 })
      assert.is_true(took < 1, ("the connection stayed %.2f s"):format(took))   -- 3.00 s on main
    end, 15)
  end)
end)

describe("a streamed body after a bodyless status (res:status(204); res:write(...))", function()
  -- HTTP/2: DATA frames follow the 204 (curl/nghttp2: RST_STREAM PROTOCOL_ERROR, the answer is
  -- lost); HTTP/1.1: the chunked body follows a 204 without Transfer-Encoding, 30 stray bytes
  -- in front of the next response on the keep-alive connection.
  it("HTTP/2: the 204 arrives whole, without DATA (curl)", function()
    helper.run(function()
      local srv = assert(http.server { host = "127.0.0.1", port = 0, handler = function(_, res)
        res:status(204)
        assert(res:write("streamed into a 204"))
        assert(res:finish())
      end })
      local code, out, err = helper.shell(("curl -sS --http2-prior-knowledge -w '%%{http_code}' http://127.0.0.1:%d/")
        :format(srv.port))
      srv:close(0)
      assert.equal(0, code, err)
      assert.equal("204", out)
    end, 15)
  end)

  it("HTTP/1.1: nothing after the 204 head", function()
    helper.run(function()
      local srv = assert(http.server { host = "127.0.0.1", port = 0, handler = function(_, res)
        res:status(204)
        res:write("streamed into a 204")
      end })
      local c = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
      assert(c:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      local head = assert(c:read("*l"))
      assert.equal("HTTP/1.1 204 No Content", head)
      repeat local line = assert(c:read("*l")) until line == ""
      local extra = c:recv(100, 0.5)
      assert.is_nil(extra, "bytes after the 204 head: " .. tostring(extra))
      c:close()
      srv:close(0)
    end, 15)
  end)
end)

describe("a handler's Content-Length on a 204 (RFC 9110 §8.6: a 204 has none)", function()
  -- it was sent as given: HTTP/2 (curl/nghttp2) resets the stream as malformed, HTTP/1.1
  -- sends a field the status forbids
  local function handler(_, res)
    res:header("content-length", "0")
    res:status(204)
    res:send("")
  end

  it("HTTP/2: the 204 arrives, without it (curl)", function()
    helper.run(function()
      local srv = assert(http.server { host = "127.0.0.1", port = 0, handler = handler })
      local code, out, err = helper.shell(("curl -sS --http2-prior-knowledge -D - -o /dev/null http://127.0.0.1:%d/")
        :format(srv.port))
      srv:close(0)
      assert.equal(0, code, err)
      assert.matches("^HTTP/2 204", out)
      assert.is_nil(out:lower():find("content-length", 1, true), out)
    end, 15)
  end)

  it("HTTP/1.1: the 204 head has none", function()
    helper.run(function()
      local srv = assert(http.server { host = "127.0.0.1", port = 0, handler = handler })
      local c = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
      assert(c:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.equal("HTTP/1.1 204 No Content", assert(c:read("*l")))
      local fields = {}
      repeat
        local line = assert(c:read("*l"))
        fields[#fields + 1] = line:lower()
      until line == ""
      assert.is_nil(table.concat(fields, "\n"):find("content-length", 1, true))
      c:close()
      srv:close(0)
    end, 15)
  end)
end)

describe("HTTP/2 flow control: request bodies a handler never reads", function()
  -- their bytes are never given back to the connection's receive window (nghttp2_session_consume
  -- runs only as a handler reads): once conn_window bytes were left unread, the client can send
  -- no more body bytes on the connection, and a handler that reads its body waits for the
  -- body timeout (408). With the defaults: 32 unread 256 KiB uploads (a 401 or 413 answered
  -- before reading) wedge a browser's connection for every later upload.
  it("uploads keep flowing after handlers that answered without reading", function()
    helper.run(function()
      local results = {}
      local srv = assert(http.server { host = "127.0.0.1", port = 0, timeouts = { body = 2 },
        http2 = { stream_window = 16384, conn_window = 65535 },
        handler = function(req, res)
          if req.path == "/read" then
            local body, err = req:body()
            results[#results + 1] = body and #body or err
          end
          res:status(403)
          res:send("no")     -- the upload of the other paths is never read
        end })
      local file = helper.writefile(os.tmpname() .. ".py", [[
import socket, sys, time
import h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
c.initiate_connection(); s.sendall(c.data_to_send())
for path in ["/noread"] * 5 + ["/read"]:
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x")])
    sent, finished, t0 = 0, False, time.time()
    while not finished and time.time() - t0 < 4:
        w = min(c.local_flow_control_window(sid), 16384 - sent, c.max_outbound_frame_size)
        if sent < 16384 and w > 0:
            c.send_data(sid, b"x" * w, end_stream=(sent + w == 16384)); sent += w
        s.sendall(c.data_to_send())
        s.settimeout(0.1)
        try: data = s.recv(65536)
        except socket.timeout: data = b""
        for ev in c.receive_data(data):
            if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                finished = True
        s.sendall(c.data_to_send())
    print(path, sent)
]])
      local code, out, err = helper.shell(("/usr/bin/python3 %s %d"):format(file, srv.port), 40)
      os.remove(file)
      srv:close(0)
      assert.equal(0, code, err)
      assert.matches("/read 16384", out)        -- "/read 0" on main: the window is shut
      assert.same({ 16384 }, results)            -- { "request body timeout" } on main
    end, 60)
  end)
end)
