--- gRPC over moonwire's HTTP/2, against a real gRPC implementation: Node's @grpc/grpc-js
-- (spec/peers/grpc_peer.js, installed by scripts/install-peers) as the server of moonwire's
-- client and as the client of moonwire's server, cleartext by prior knowledge. The Lua side
-- writes gRPC's framing by hand (a 1-byte flag, a 4-byte big-endian length, the message) and
-- carries the status in trailers, as a gRPC library written in Lua on moonwire would: unary,
-- server-streaming and client-streaming calls, an error status, a trailers-only response, an
-- unknown method, many calls multiplexed on one connection. Loopback only, port 0.

local helper = require "spec.helper"
local run = helper.run
local http = require "moonwire.http"
local procs = require "spec.peers.procs"

local PEER = procs.peers .. "/grpc_peer.js"

local function frame(msg) return string.pack(">B s4", 0, msg) end

-- the messages of a body made of gRPC frames (raises on a torn frame)
local function messages(body)
  local list, pos = {}, 1
  while pos <= #body do
    local flag, msg, nxt = string.unpack(">B s4", body, pos)
    assert(flag == 0, "a compressed message")
    list[#list + 1] = msg
    pos = nxt
  end
  return list
end

-- Messages out of body chunks as they come: feed(chunk) appends each message it completes
-- to `got` and returns the bytes of a frame still torn (0 at a frame's end).
local function deframer()
  local buf, got = "", {}
  return got, function(chunk)
    buf = buf .. chunk
    while #buf >= 5 do
      local len = string.unpack(">I4", buf, 2)
      if #buf < 5 + len then break end
      got[#got + 1] = buf:sub(6, 5 + len)
      buf = buf:sub(6 + len)
    end
    return #buf
  end
end

describe("gRPC interop with @grpc/grpc-js", function()
  local peer_ok = procs.exists(procs.NODE) and procs.exists(procs.peers .. "/node_modules/@grpc/grpc-js/package.json")

  it("the peer is installed (scripts/install-peers)", function()
    assert.is_true(peer_ok, "node or spec/peers/node_modules/@grpc/grpc-js is missing: run scripts/install-peers")
  end)

  describe("moonwire's client against a grpc-js server", function()
    local function with_server(fn)
      run(function()
        local p <close> = procs.start("grpc-js server", ("%s %s server"):format(procs.NODE, procs.quote(PEER)), 60)
        local port = assert(math.tointeger(tonumber(p:wait_event(function(e) return e.port end, 20).port)))
        local c = http.client{ http2 = true }
        local _ <close> = setmetatable({}, { __close = function() c:close() end })
        fn(c, "http://127.0.0.1:" .. port)
      end, 60)
    end

    local function call(c, base, method, body)
      return assert(c:request{ method = "POST", url = base .. "/mw.Echo/" .. method,
        headers = { ["content-type"] = "application/grpc", te = "trailers" }, body = body })
    end

    it("unary: the reply message, grpc-status 0 and the server's trailing metadata in res.trailers", function()
      with_server(function(c, base)
        local res = call(c, base, "Say", frame("ping"))
        assert.equal(200, res.status)
        assert.equal("2", res.version)
        assert.truthy(res.headers["content-type"]:find("^application/grpc"))   -- grpc-js: +proto
        assert.same({ "echo:ping" }, messages(assert(res:body())))
        assert.equal("0", res.trailers["grpc-status"])
        assert.equal("grpc-js", res.trailers["x-served-by"])
      end)
    end)

    it("an error status: a trailers-only response (grpc-status in the head, no body)", function()
      with_server(function(c, base)
        local res = call(c, base, "Fail", frame("x"))
        assert.equal(200, res.status)
        assert.equal("", assert(res:body()))
        assert.equal("5", res.headers["grpc-status"])
        assert.equal("no%20such%20thing", res.headers["grpc-message"])   -- percent-encoded (gRPC's rule)
        -- an unknown method: UNIMPLEMENTED the same way
        local res2 = call(c, base, "Missing", frame("x"))
        assert.equal("", assert(res2:body()))
        assert.equal("12", res2.headers["grpc-status"])
      end)
    end)

    it("server streaming: each message read as it comes through body_reader, then the status", function()
      with_server(function(c, base)
        local res = call(c, base, "Count", frame("5"))
        local got, feed = deframer()
        local torn = 0
        for chunk in res:body_reader() do torn = feed(chunk) end
        assert.equal(0, torn)
        assert.same({ "n:1", "n:2", "n:3", "n:4", "n:5" }, got)
        assert.equal("0", res.trailers["grpc-status"])
      end)
    end)

    it("client streaming: the request body a function that yields one frame at a time", function()
      with_server(function(c, base)
        local parts, i = { "a", "bb", "ccc" }, 0
        local res = call(c, base, "Collect", function()
          i = i + 1
          return parts[i] and frame(parts[i]) or nil
        end)
        assert.same({ "a+bb+ccc" }, messages(assert(res:body())))
        assert.equal("0", res.trailers["grpc-status"])
      end)
    end)

    it("50 calls from 50 tasks share one connection, each gets its own reply", function()
      with_server(function(c, base)
        local mw = helper.mw
        local tasks = {}
        for i = 1, 50 do
          tasks[i] = mw.spawn(function()
            local res = call(c, base, "Say", frame("m" .. i))
            return messages(assert(res:body()))[1], res.trailers["grpc-status"]
          end)
        end
        for i = 1, 50 do
          local ok, msg, status = tasks[i]:join()
          assert(ok, msg)
          assert.equal("echo:m" .. i, msg)
          assert.equal("0", status)
        end
        assert.equal(1, c:stats().h2_opened)
      end)
    end)
  end)

  describe("a grpc-js client against moonwire's server", function()
    it("unary, error, server and client streaming, unknown method, 50 calls at once: as grpc-js reads them",
      function()
      run(function()
        local function status(res, code, msg)
          res:trailer("grpc-status", tostring(code))
          if msg then res:trailer("grpc-message", msg) end
        end
        local seen = {}
        local srv = assert(http.server{ host = "127.0.0.1", port = 0, error_log = function() end,
          handler = function(req, res)
            assert(req.version == "2" and req.method == "POST")
            assert(req.headers["content-type"]:find("^application/grpc"))
            seen[#seen + 1] = req.headers.te
            local method = req.path:match("^/mw%.Echo/(%a+)$")
            res:header("content-type", "application/grpc")
            if method == "Say" then
              local msg = messages(assert(req:body()))[1]
              res:trailer("x-served-by", "moonwire")
              status(res, 0)
              res:write(frame("echo:" .. msg))
            elseif method == "Fail" then
              -- trailers-only: the status in the head, which ends the stream
              res:header("grpc-status", "5")
              res:header("grpc-message", "no such thing")
              return res:send("")
            elseif method == "Count" then
              local n = tonumber(messages(assert(req:body()))[1])
              status(res, 0)
              for i = 1, n do assert(res:write(frame("n:" .. i))) end
            elseif method == "Collect" then
              -- the frames as they arrive (the client writes them one by one)
              local got, feed = deframer()
              for chunk in req:body_reader() do feed(chunk) end
              status(res, 0)
              res:write(frame(table.concat(got, "+")))
            else
              res:header("grpc-status", "12")
              res:header("grpc-message", "unknown method " .. req.path)
              return res:send("")
            end
            res:finish()
          end })
        local _ <close> = setmetatable({}, { __close = function() srv:close(0) end })
        local code, out, err = procs.shell(("%s %s client %d"):format(procs.NODE, procs.quote(PEER), srv.port), 30)
        assert.equal(0, code, err)
        local by = {}
        for _, e in ipairs(procs.events(out)) do by[e.method] = e end
        assert.same({ method = "Say", code = "0", details = "", replies = "echo:ping", trailer = "moonwire" }, by.Say)
        assert.same({ method = "Fail", code = "5", details = "no such thing", replies = "", trailer = "" }, by.Fail)
        assert.same({ method = "Count", code = "0", details = "", replies = "n:1|n:2|n:3", trailer = "" }, by.Count)
        assert.same({ method = "Collect", code = "0", details = "", replies = "a+bb+ccc", trailer = "" }, by.Collect)
        assert.equal("12", by.Missing.code)
        assert.equal("unknown method /mw.Echo/Missing", by.Missing.details)
        assert.equal("50", by.Burst.good)
        -- grpc-js sends te: trailers on every call
        assert.equal(55, #seen)
        for _, te in ipairs(seen) do assert.equal("trailers", te) end
      end, 60)
    end)
  end)
end)
