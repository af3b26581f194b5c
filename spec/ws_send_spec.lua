-- ws:send's fast path (one writev from C) and its fallback when the socket takes only part of
-- a frame: a large message to a peer that is not reading yet, then small ones, must arrive
-- whole and in order; after a broadcast queue was used, sends still keep their order.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

describe("WebSocket send", function()
  it("a frame the socket takes only in part is finished in order, before the next one", function()
    run(function()
      local sent = mw.channel(1)
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket())
        local big = helper.pattern(8 * 1024 * 1024)
        assert(ws:send(big, "binary"))        -- far more than the socket buffer takes at once
        assert(ws:send("after", "text"))
        mw.websocket.broadcast({ ws }, "queued")
        assert(ws:send("last", "text"))
        sent:send(true)
        ws:receive()
      end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(srv.port)))
      -- 8 MiB is more than loopback socket buffers hold: the first writev is partial anyway
      local msg, kind = ws:receive(10)
      assert.equal("binary", kind)
      assert.equal(8 * 1024 * 1024, #msg)
      assert.is_true(msg == helper.pattern(8 * 1024 * 1024))
      assert.same({ "after", "text" }, { ws:receive(5) })
      assert.same({ "queued", "text" }, { ws:receive(5) })
      assert.same({ "last", "text" }, { ws:receive(5) })
      assert(sent:recv(5))
      ws:close()
      srv:close()
    end, 20)
  end)

  it("a handler raising after the upgrade: the peer gets 1011, the error is logged, the server goes on", function()
    run(function()
      local logged = {}
      local srv = assert(http.server{ host = "127.0.0.1", port = 0,
        error_log = function(line) logged[#logged + 1] = line end,
        handler = function(req, res)
          if req.path == "/plain" then return res:send("still serving") end
          local ws = assert(req:websocket())
          assert(ws:receive(5))
          error("boom after the upgrade")
        end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/ws"):format(srv.port)))
      assert(ws:send("go"))
      local msg, state, code = ws:receive(5)
      assert.same({ nil, "closed", 1011 }, { msg, state, code })
      assert.equal(1, #logged)
      assert.matches("handler error for GET /ws: .*boom after the upgrade", logged[1])
      local res = assert(http.get(("http://127.0.0.1:%d/plain"):format(srv.port)))
      assert.equal("still serving", res:body())
      srv:close()
    end, 20)
  end)
end)
