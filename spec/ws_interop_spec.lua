-- WebSocket interop (docs/websocket.md) against independent implementations, both directions:
--   python3-websockets (Debian's, run by /usr/bin/python3): spec/peers/py_server.py, py_client.py
--   node's `ws` (npm, installed by scripts/install-peers): spec/peers/node_server.js, node_client.js
--   headless Chromium (Debian's): the chat demo (examples/chat) in two pages, driven over the
--   DevTools protocol by spec/peers/chat_browser.js, with a screenshot in build/.
-- Text (UTF-8), binary, empty and 1 MiB messages, permessage-deflate (the negotiated parameters
-- checked on both sides; context takeover and window bits exercised with repeated messages and
-- long-distance repeats, which a peer's inflater refuses when the compressor broke the
-- agreement; compression seen on the wire through node's byte counts), fragmentation,
-- subprotocols, pings both ways, close codes and reasons both ways, the close when a handler
-- returns, and one broadcast to ws clients that negotiated different deflate parameters.
-- Our servers listen on 127.0.0.1 port 0, and so do the peers'; peers run in the background
-- (the loop keeps serving) and are polled with mw.sleep in bounded loops. A missing peer fails
-- its tests with how to install it (scripts/install-peers); nothing is skipped.

local helper = require "spec.helper"
local procs = require "spec.peers.procs"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local MiB = 1024 * 1024
local quote = procs.quote
local PEERS = procs.peers
local LIMIT = 30
local shell = helper.shell

---------------------------------------------------------------------------------------------
-- prerequisites: fail (never skip) with what to do

local python_ok
local function need_python()
  assert(procs.exists(procs.PYTHON), procs.PYTHON .. " is missing: run scripts/install-deps")
  if python_ok == nil then   -- once (a blocking check, made before any peer runs)
    python_ok = os.execute(procs.PYTHON .. " -c 'import websockets' >/dev/null 2>&1") == true
  end
  assert(python_ok, "python3-websockets is missing for " .. procs.PYTHON .. ": run scripts/install-deps")
end

local function need_node()
  assert(procs.exists(procs.NODE), procs.NODE .. " is missing: run scripts/install-deps (nodejs)")
  assert(procs.exists(PEERS .. "/node_modules/ws/package.json"),
    "node's ws is not installed in spec/peers/node_modules: run scripts/install-peers")
end

local function need_chromium()
  need_node()
  assert(procs.exists(procs.CHROMIUM),
    "Chromium is not installed (" .. procs.CHROMIUM .. "): run scripts/install-peers")
end

---------------------------------------------------------------------------------------------
-- payloads

-- Pseudo-random bytes (xorshift64), reproducible: incompressible binary.
local function random_bytes(n, seed)
  local x = seed or 0x2545F4914F6CDD1D
  local parts = {}
  for i = 1, (n + 7) // 8 do
    x = x ~ (x << 13)
    x = x ~ (x >> 7)
    x = x ~ (x << 17)
    parts[i] = string.pack("<i8", x)
  end
  return table.concat(parts):sub(1, n)
end

local ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

-- Text whose repeats are `block` bytes apart: a compressor whose window is larger than the
-- negotiated one writes back-references the peer's inflater refuses.
local function far_repeats(block, times, seed)
  local b = random_bytes(block, seed):gsub(".", function(c)
    local i = c:byte() % 64 + 1
    return ALPHA:sub(i, i)
  end)
  return b:rep(times)
end

local ALL_BYTES = (function()
  local t = {}
  for i = 0, 255 do t[#t + 1] = string.char(i) end
  return table.concat(t):rep(4)
end)()

local UNICODE = "héllo wörld ✓ 🌙"

---------------------------------------------------------------------------------------------
-- our side

local errors = {}

local function serve(handler)
  errors = {}
  return assert(http.server { host = "127.0.0.1", port = 0, handler = handler,
    error_log = function(msg) errors[#errors + 1] = msg end })
end

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

-- Our echo endpoint: echoes every message with its kind, except the text commands the peers'
-- clients send: `cmd:ping DATA` (a ping of ours from another task, then "pong:DATA"),
-- `cmd:close CODE REASON` (we close) and `cmd:return` (the handler returns with the connection
-- open: the server closes it with 1000). Records per request path what it saw. Answers one
-- message; returns true when the connection is done with (closed, or to be returned).
local function echo_answer(ws, rec, msg, kind)
  rec.messages = rec.messages + 1
  local cmd, arg
  if kind == "text" then cmd, arg = msg:match("^cmd:(%S+) ?(.*)$") end
  if cmd == "return" then
    rec.ending = { "returned" }
    return true
  elseif cmd == "close" then
    local c, r = arg:match("^(%d+) ?(.*)$")
    rec.close_result = ws:close(math.tointeger(tonumber(c)), r)
    rec.ending = { "we closed", ws.close_code, ws.close_reason }
    return true
  elseif cmd == "ping" then
    -- (with message handlers the pong arrives as a message would: not while one runs)
    mw.spawn(function()
      local rtt, e = ws:ping(arg, 5)
      rec.ping_rtt = rtt
      ws:send(rtt and ("pong:" .. arg) or ("ping failed: " .. tostring(e)))
    end)
  else
    assert(ws:send(msg, kind))
  end
  return false
end

-- echo_server(ws_opts) -> srv, seen: the endpoint with a receiving task per connection.
-- With `handlers`, written with message handlers (ws:on) instead: the server's handler returns
-- at once and the connection lives on without a task; `cmd:return` closes with 1000 (there is
-- no handler to return from), and the close handler marks the record done.
local function echo_server(ws_opts, handlers)
  local seen = {}
  local srv = serve(function(req)
    local rec = { messages = 0 }
    seen[req.path] = rec
    local ws, err, status = req:websocket(ws_opts)
    if not ws then
      rec.refused = { err, status }
      return
    end
    rec.protocol, rec.extensions = ws.protocol, ws.extensions
    if handlers then
      ws:on("close", function(w, code, reason)
        rec.ending = rec.ending or { "closed", code, reason }
        rec.state = w.state
        rec.done = true
      end)
      ws:on("message", function(w, msg, kind)
        if echo_answer(w, rec, msg, kind) and w.state == "open" then w:close(1000) end
      end)
      return
    end
    while true do
      local msg, kind, code, reason = ws:receive()
      if msg == nil then
        rec.ending = { kind, code, reason }
        break
      end
      if echo_answer(ws, rec, msg, kind) then break end
    end
    rec.state = ws.state
    rec.done = true
  end)
  return srv, seen
end

local function handler_echo_server(ws_opts) return echo_server(ws_opts, true) end

-- our server in both styles, for the client interop cases: a receiving task per
-- connection, and message handlers (ws:on)
local SERVER_STYLES = { { "", echo_server }, { " written with message handlers (ws:on)", handler_echo_server } }

-- Our client on `path` of a peer server, with a reader task feeding `inbox` (so pings, which
-- need another task receiving, work). Returns the connection and next(): the next message
-- (msg, kind) or the close (nil, "closed", code, reason).
local function our_client(port, path, opts)
  opts = opts or {}
  opts.timeout = opts.timeout or 5
  local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d%s"):format(port, path), opts))
  local inbox = mw.channel(64)
  mw.spawn(function()
    while true do
      local msg, kind, code, reason = ws:receive()
      inbox:send { msg, kind, code, reason }
      if msg == nil then return end
    end
  end)
  local function next_msg()
    local m = assert(inbox:recv(10))
    return m[1], m[2], m[3], m[4]
  end
  return ws, next_msg
end

local function echo(ws, next_msg, msg, kind)
  assert(ws:send(msg, kind))
  local got, k, code = next_msg()
  assert.is_true(got == msg, ("%s echo of %d bytes came back as %s (%s %s)"):format(kind or "text", #msg,
    got and (#got .. " bytes") or "nothing", tostring(k), tostring(code)))
  assert.equal(kind or "text", k)
end

-- The exchange of our client against a peer server that speaks the command protocol:
-- c1: text, binary, empty, 1 MiB text and binary, repeated messages, far repeats, a ping each
-- way, then we close with 4000; c2: one echo, then the peer closes with 4001.
-- `info(ws, next_msg)` (node) returns the peer's wire byte counts. Returns what we saw.
local function our_client_exchange(port, opts, info)
  local seen = {}
  local ws, next_msg = our_client(port, "/c1", opts())
  seen.protocol, seen.extensions = ws.protocol, ws.extensions
  echo(ws, next_msg, UNICODE)
  echo(ws, next_msg, ALL_BYTES, "binary")
  echo(ws, next_msg, "")
  echo(ws, next_msg, "", "binary")
  local before = info and info(ws, next_msg)
  echo(ws, next_msg, helper.pattern(MiB))
  local after = info and info(ws, next_msg)
  if info then
    seen.big_text_wire_in = after.bytes_read - before.bytes_read
    seen.big_text_wire_out = after.bytes_written - before.bytes_written
  end
  echo(ws, next_msg, random_bytes(MiB), "binary")
  local repeated = helper.pattern(64 * 1024)
  for _ = 1, 3 do echo(ws, next_msg, repeated) end
  echo(ws, next_msg, far_repeats(3200, 6))
  -- our ping: the reader task takes the pong
  local rtt, err = ws:ping("lua-ping", 5)
  assert.is_number(rtt, "no pong: " .. tostring(err))
  -- the peer's ping: our reader answers it by itself
  assert(ws:send("cmd:ping srv-ping"))
  assert.same({ "pong:srv-ping", "text" }, { next_msg() })
  -- we close with a code and a reason; the peer echoes them
  assert.is_true(ws:close(4000, "moonwire says bye ✓"))
  assert.same({ nil, "closed", 4000, "moonwire says bye ✓" }, { next_msg() })
  assert.equal("closed", ws.state)
  assert.equal(4000, ws.close_code)
  -- c2: the peer closes with a code and a reason
  local ws2, next2 = our_client(port, "/c2", opts())
  echo(ws2, next2, "before close")
  assert(ws2:send("cmd:close 4001 server says bye"))
  assert.same({ nil, "closed", 4001, "server says bye" }, { next2() })
  assert.equal("closed", ws2.state)
  assert.equal(4001, ws2.close_code)
  assert.equal("server says bye", ws2.close_reason)
  -- after the close: receive keeps saying closed, send says closed
  assert.same({ nil, "closed", 4001, "server says bye" }, { ws2:receive(1) })
  assert.same({ nil, "closed", "closed" }, { ws2:send("late") })
  return seen
end

-- The peer server's two connections ended as they should (its own log: the code and reason
-- of the close frame it received). c1: ours, code and reason; c2: our answer to its close,
-- which echoes the code (RFC 6455 5.5.1: the reason need not be echoed).
local function check_peer_closes(peer)
  local c1 = peer:wait_event(function(e) return e.event == "closed" and e.path == "/c1" end)
  assert.same({ "4000", "moonwire says bye ✓", "" }, { c1.code, c1.reason, c1.error })
  local c2 = peer:wait_event(function(e) return e.event == "closed" and e.path == "/c2" end)
  assert.same({ "4001", "" }, { c2.code, c2.error })
end

-- The peer client's report (python's or node's) of the standard exchange. Its close_code and
-- close_reason are those of the close frame it received: for c1 our answer to its close (the
-- code echoed), for c2 our own close (code and reason).
local function check_client_report(r, who, out, err)
  local context = ("\n%s said:\n%s\n%s"):format(who, out, err)
  assert.equal("1", r.done, "the exchange did not finish" .. context)
  for _, k in ipairs { "text", "binary", "empty", "big_text", "big_binary", "repeat1", "repeat2",
                       "repeat3", "window", "ping", "server_ping" } do
    assert.equal("ok", r["c1." .. k], "c1." .. k .. context)
  end
  assert.equal("4000", r["c1.close_code"], context)
  assert.equal("ok", r["c2.text"])
  assert.same({ "4001", "server says bye" }, { r["c2.close_code"], r["c2.close_reason"] })
  -- c3 (when asked for): the handler returned, the server closed with 1000
  if r["c3.close_code"] then assert.equal("1000", r["c3.close_code"], "c3" .. context) end
end

-- What our echo server saw of a peer client's standard exchange.
local function check_our_server_saw(seen, who)
  assert.is_true(procs.wait_for(function()
    return seen["/c1"] and seen["/c1"].done and seen["/c2"] and seen["/c2"].done
  end), "our handlers did not finish")
  local c1, c2 = seen["/c1"], seen["/c2"]
  assert.same({ "closed", 4000, who .. " says bye" }, c1.ending)
  assert.equal("closed", c1.state)
  assert.is_number(c1.ping_rtt)
  assert.is_true(c2.close_result)
  assert.same({ "we closed", 4001, "server says bye" }, c2.ending)
  assert.equal("closed", c2.state)
  assert.same({}, errors)
end

-- Runs a peer client program to its end; returns its report (kv), stdout, stderr.
local function run_client(cmd, who)
  local code, out, err = procs.shell(cmd, 40)
  assert.equal(0, code, ("%s client failed (exit %s):\n%s\n%s"):format(who, tostring(code), out, err))
  return procs.kv(out), out, err
end

---------------------------------------------------------------------------------------------
-- python3-websockets

local function py_server(args)
  need_python()
  local p = procs.start("python server", ("%s %s %s"):format(procs.PYTHON, quote(PEERS .. "/py_server.py"),
    args or ""), 60)
  local ok, e = pcall(p.wait_event, p, function(ev) return ev.event == "listening" end)
  if not ok then
    p:stop()
    error(e, 0)
  end
  p.port = assert(math.tointeger(tonumber(e.port)))
  return p
end

local function py_client(port, args)
  need_python()
  return run_client(("%s %s %s %s"):format(procs.PYTHON, quote(PEERS .. "/py_client.py"),
    quote("ws://127.0.0.1:" .. port), args or ""), "python")
end

describe("WebSocket interop with python3-websockets:", function()
  before_each(need_python)   -- a missing peer fails each test, saying how to install it

  it("our client <-> python server: every kind of message, pings and closes both ways; " ..
     "permessage-deflate with python's 12-bit windows; the subprotocol python picks", function()
    run(function()
      local peer <close> = py_server("--protocols chat,other")
      local seen = our_client_exchange(peer.port,
        function() return { deflate = true, protocols = { "mw.unknown", "chat" } } end)
      assert.equal("chat", seen.protocol)
      assert.equal("permessage-deflate; server_max_window_bits=12; client_max_window_bits=12", seen.extensions)
      check_peer_closes(peer)
      local open = peer:wait_event(function(e) return e.event == "open" and e.path == "/c1" end)
      assert.equal("chat", open.subprotocol)
      assert.equal("permessage-deflate; client_max_window_bits", open.offer)
      assert.equal("permessage-deflate(remote_no_context_takeover=False,local_no_context_takeover=False," ..
        "remote_max_window_bits=12,local_max_window_bits=12)", open.negotiated)
    end, LIMIT)
  end)

  it("our client (fragmenting) <-> python server that asks for no context takeover both ways and " ..
     "10/9-bit windows", function()
    run(function()
      local peer <close> = py_server("--protocols chat --deflate " .. quote(
        '{"server_no_context_takeover": true, "client_no_context_takeover": true, ' ..
        '"server_max_window_bits": 10, "client_max_window_bits": 9}'))
      local seen = our_client_exchange(peer.port,
        function() return { deflate = true, protocols = { "chat" }, fragment_size = 64 * 1024 } end)
      assert.equal("permessage-deflate; server_no_context_takeover; client_no_context_takeover; " ..
        "server_max_window_bits=10; client_max_window_bits=9", seen.extensions)
      check_peer_closes(peer)
      local open = peer:wait_event(function(e) return e.event == "open" and e.path == "/c1" end)
      assert.equal("permessage-deflate(remote_no_context_takeover=True,local_no_context_takeover=True," ..
        "remote_max_window_bits=9,local_max_window_bits=10)", open.negotiated)
    end, LIMIT)
  end)

  it("our client <-> python server without compression or a common subprotocol: none is negotiated",
    function()
    run(function()
      local peer <close> = py_server("--protocols chat --deflate off")
      local seen = our_client_exchange(peer.port,
        function() return { deflate = true, protocols = { "superchat" } } end)
      assert.is_nil(seen.protocol)
      assert.equal("", seen.extensions)
      check_peer_closes(peer)
      local open = peer:wait_event(function(e) return e.event == "open" and e.path == "/c1" end)
      assert.same({ "", "", "" }, { open.subprotocol, open.extensions, open.negotiated })
    end, LIMIT)
  end)

  for _, style in ipairs(SERVER_STYLES) do
    it("python client <-> our server" .. style[1] .. ": every kind of message, pings and closes both ways; " ..
       "permessage-deflate negotiated; our preferred subprotocol", function()
      run(function()
        local srv, seen = style[2] { protocols = { "chat", "superchat" } }
        local _g <close> = guard(srv)
        local r, out, err = py_client(srv.port, "--protocols superchat,chat --c3")
        check_client_report(r, "python", out, err)
        assert.equal("1000", r["c3.close_code"])
        assert.same({ "returned" }, seen["/c3"].ending)
        assert.equal("chat", r["c1.protocol"])
        assert.equal("permessage-deflate; client_max_window_bits", r["c1.offer"])
        assert.equal("permessage-deflate", r["c1.extensions"])
        assert.equal("permessage-deflate(remote_no_context_takeover=False,local_no_context_takeover=False," ..
          "remote_max_window_bits=15,local_max_window_bits=15)", r["c1.negotiated"])
        check_our_server_saw(seen, "python")
        assert.same({ "chat", "permessage-deflate" }, { seen["/c1"].protocol, seen["/c1"].extensions })
        assert.is_true(procs.wait_for(function() return srv:connections() == 0 end), "connections left open")
      end, LIMIT)
    end)
  end

  it("python client offering no context takeover both ways and 10/11-bit windows <-> our server", function()
    run(function()
      local srv, seen = echo_server { protocols = { "chat" } }
      local _g <close> = guard(srv)
      local r, out, err = py_client(srv.port, "--protocols chat --deflate " .. quote(
        '{"server_no_context_takeover": true, "client_no_context_takeover": true, ' ..
        '"server_max_window_bits": 10, "client_max_window_bits": 11}'))
      check_client_report(r, "python", out, err)
      local answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; " ..
        "server_max_window_bits=10"
      assert.equal(answer, r["c1.extensions"])
      assert.equal(answer, seen["/c1"].extensions)
      check_our_server_saw(seen, "python")
      assert.matches("remote_no_context_takeover=True,local_no_context_takeover=True," ..
        "remote_max_window_bits=10", r["c1.negotiated"], 1, true)
    end, LIMIT)
  end)

  it("python client <-> our server that asks for no context takeover itself, and one with deflate = false",
    function()
    run(function()
      local srv, seen = echo_server { protocols = { "chat" },
        deflate = { server_no_context_takeover = true, client_no_context_takeover = true } }
      local _g <close> = guard(srv)
      local r, out, err = py_client(srv.port, "--protocols chat")
      check_client_report(r, "python", out, err)
      assert.equal("permessage-deflate; server_no_context_takeover; client_no_context_takeover", r["c1.extensions"])
      assert.equal("permessage-deflate(remote_no_context_takeover=True,local_no_context_takeover=True," ..
        "remote_max_window_bits=15,local_max_window_bits=15)", r["c1.negotiated"])
      check_our_server_saw(seen, "python")

      local srv2, seen2 = echo_server { protocols = { "chat" }, deflate = false }
      local _g2 <close> = guard(srv2)
      r, out, err = py_client(srv2.port, "--protocols chat")
      check_client_report(r, "python", out, err)
      assert.same({ "", "" }, { r["c1.extensions"], r["c1.negotiated"] })
      check_our_server_saw(seen2, "python")
      assert.same({ "chat", "" }, { seen2["/c1"].protocol, seen2["/c1"].extensions })
    end, LIMIT)
  end)
end)

---------------------------------------------------------------------------------------------
-- node's ws

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c) return ("\\u%04x"):format(c:byte()) end) .. '"'
end

-- A flat Lua table as JSON (strings, numbers, booleans, arrays of strings, nested tables).
local function json(v)
  local t = type(v)
  if t == "string" then return json_string(v) end
  if t == "number" or t == "boolean" then return tostring(v) end
  if v[1] ~= nil then
    local parts = {}
    for i, x in ipairs(v) do parts[i] = json(x) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = json_string(k) .. ":" .. json(v[k]) end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function node_server(config)
  need_node()
  config.lifetime = config.lifetime or 60
  local p = procs.start("node server", ("%s %s %s"):format(procs.NODE, quote(PEERS .. "/node_server.js"),
    quote(json(config))), 60)
  local ok, e = pcall(p.wait_event, p, function(ev) return ev.event == "listening" end)
  if not ok then
    p:stop()
    error(e, 0)
  end
  p.port = assert(math.tointeger(tonumber(e.port)))
  return p
end

local function node_client(port, config)
  need_node()
  return run_client(("%s %s %s %s"):format(procs.NODE, quote(PEERS .. "/node_client.js"),
    quote("ws://127.0.0.1:" .. port), quote(json(config or {}))), "node")
end

-- cmd:info: the node server's raw byte counts on this connection.
local function node_info(ws, next_msg)
  assert(ws:send("cmd:info"))
  local msg = assert(next_msg())
  local r, w = msg:match("^bytes_read=(%d+) bytes_written=(%d+)$")
  assert(r, "bad info answer: " .. msg)
  return { bytes_read = tonumber(r), bytes_written = tonumber(w) }
end

describe("WebSocket interop with node's ws:", function()
  before_each(need_node)   -- a missing peer fails each test, saying how to install it

  -- A peer that breaks a limit mid-message gets the close code that says why: the server
  -- lingers after its close frame (closed at once with the peer's bytes unread, the socket
  -- is reset by the kernel and the peer reads 1006, never the code).
  it("ws client over max_message gets 1009, with invalid UTF-8 1007, not 1006", function()
    run(function()
      local ends = mw.channel(4)
      local srv = serve(function(req)
        local ws = assert(req:websocket { max_message = MiB, deflate = false })
        for msg, kind in ws:messages() do ws:send(msg, kind) end
        ends:send { ws.close_code, ws.close_reason }
      end)
      local _ <close> = guard(srv)
      for _, case in ipairs { { "big", 20 * MiB, 1009 }, { "badtext", 512 * 1024, 1007 } } do
        local code, out, err = shell(("%s %s ws://127.0.0.1:%d/ %s %d"):format(procs.NODE,
          quote(PEERS .. "/ws_violation_client.js"), srv.port, case[1], case[2]), 20)
        assert.equal(0, code, err)
        assert.matches("^close " .. case[3] .. " ", out, case[1])
        assert.equal(case[3], ends:recv(5)[1])
      end
    end, LIMIT)
  end)

  it("our client <-> ws server: every kind of message, pings and closes both ways; " ..
     "permessage-deflate (compressed on the wire both ways); the subprotocol ws picks", function()
    run(function()
      local peer <close> = node_server { protocols = { "chat", "other" } }
      local seen = our_client_exchange(peer.port,
        function() return { deflate = true, protocols = { "mw.unknown", "chat" } } end, node_info)
      assert.equal("chat", seen.protocol)
      assert.equal("permessage-deflate", seen.extensions)
      -- 1 MiB of compressible text crossed the wire compressed, both ways
      assert.is_true(seen.big_text_wire_in < MiB / 8, "we sent " .. seen.big_text_wire_in .. " bytes")
      assert.is_true(seen.big_text_wire_out < MiB / 8, "ws sent " .. seen.big_text_wire_out .. " bytes")
      check_peer_closes(peer)
      local open = peer:wait_event(function(e) return e.event == "open" and e.path == "/c1" end)
      assert.same({ "chat", "permessage-deflate; client_max_window_bits", "permessage-deflate", "{}" },
        { open.subprotocol, open.offer, open.extensions, open.negotiated })
    end, LIMIT)
  end)

  it("our client <-> ws server with serverNoContextTakeover, clientNoContextTakeover and 10/9-bit windows",
    function()
    run(function()
      local peer <close> = node_server { protocols = { "chat" }, deflate = {
        serverNoContextTakeover = true, clientNoContextTakeover = true,
        serverMaxWindowBits = 10, clientMaxWindowBits = 9 } }
      local seen = our_client_exchange(peer.port,
        function() return { deflate = true, protocols = { "chat" } } end, node_info)
      assert.equal("permessage-deflate; client_max_window_bits=9; server_no_context_takeover; " ..
        "client_no_context_takeover; server_max_window_bits=10", seen.extensions)
      assert.is_true(seen.big_text_wire_in < MiB / 4, "we sent " .. seen.big_text_wire_in .. " bytes")
      assert.is_true(seen.big_text_wire_out < MiB / 4, "ws sent " .. seen.big_text_wire_out .. " bytes")
      check_peer_closes(peer)
      local open = peer:wait_event(function(e) return e.event == "open" and e.path == "/c1" end)
      assert.equal('{"client_max_window_bits":9,"server_no_context_takeover":true,' ..
        '"client_no_context_takeover":true,"server_max_window_bits":10}', open.negotiated)
    end, LIMIT)
  end)

  -- Regression (found by review): our client refused client_max_window_bits=8, which RFC
  -- 7692 7.1.2.2 allows in answer to our offer of the parameter without a value, so a ws
  -- server with clientMaxWindowBits 8 could not be connected to. (That what we send refers
  -- at most 256 bytes back is checked strictly in ws_client_conformance_spec.)
  it("our client <-> ws server with clientMaxWindowBits 8 (and serverMaxWindowBits 8): " ..
     "messages both ways, large, repeated and far repeats", function()
    run(function()
      for _, deflate in ipairs { { clientMaxWindowBits = 8 }, { clientMaxWindowBits = 8, serverMaxWindowBits = 8 } } do
        local peer <close> = node_server { protocols = { "chat" }, deflate = deflate }
        local seen = our_client_exchange(peer.port,
          function() return { deflate = true, protocols = { "chat" } } end, node_info)
        assert.equal("permessage-deflate; client_max_window_bits=8" ..
          (deflate.serverMaxWindowBits and "; server_max_window_bits=8" or ""), seen.extensions)
        assert.is_true(seen.big_text_wire_in < MiB / 8, "we sent " .. seen.big_text_wire_in .. " bytes")
        assert.is_true(seen.big_text_wire_out < MiB / 8, "ws sent " .. seen.big_text_wire_out .. " bytes")
        check_peer_closes(peer)
      end
    end, LIMIT)
  end)

  it("our client <-> ws server without perMessageDeflate: no extension, 1 MiB travels as it is", function()
    run(function()
      local peer <close> = node_server { protocols = { "chat" }, deflate = false }
      local seen = our_client_exchange(peer.port,
        function() return { deflate = true, protocols = { "chat" } } end, node_info)
      assert.equal("", seen.extensions)
      assert.is_true(seen.big_text_wire_in > MiB, "we sent " .. seen.big_text_wire_in .. " bytes")
      assert.is_true(seen.big_text_wire_out > MiB, "ws sent " .. seen.big_text_wire_out .. " bytes")
      check_peer_closes(peer)
    end, LIMIT)
  end)

  for _, style in ipairs(SERVER_STYLES) do
    it("ws client <-> our server" .. style[1] .. ": every kind of message, pings and closes both ways; " ..
       "permessage-deflate (compressed on the wire both ways); our preferred subprotocol", function()
      run(function()
        local srv, seen = style[2] { protocols = { "chat", "superchat" } }
        local _g <close> = guard(srv)
        local r, out, err = node_client(srv.port, { protocols = { "superchat", "chat" }, c3 = true })
        check_client_report(r, "node", out, err)
        assert.equal("1000", r["c3.close_code"])
        assert.same({ "returned" }, seen["/c3"].ending)
        assert.same({ "chat", "permessage-deflate", "{}" },
          { r["c1.protocol"], r["c1.extensions"], r["c1.negotiated"] })
        assert.is_true(tonumber(r["c1.big_text_wire_in"]) < MiB / 8, "we sent " .. r["c1.big_text_wire_in"])
        assert.is_true(tonumber(r["c1.big_text_wire_out"]) < MiB / 8, "ws sent " .. r["c1.big_text_wire_out"])
        check_our_server_saw(seen, "node")
        assert.same({ "chat", "permessage-deflate" }, { seen["/c1"].protocol, seen["/c1"].extensions })
        assert.is_true(procs.wait_for(function() return srv:connections() == 0 end), "connections left open")
      end, LIMIT)
    end)
  end

  it("ws client with serverNoContextTakeover, clientNoContextTakeover and 11/10-bit windows <-> our server " ..
     "(fragmenting)", function()
    run(function()
      local srv, seen = echo_server { protocols = { "chat" }, fragment_size = 16 * 1024 }
      local _g <close> = guard(srv)
      local r, out, err = node_client(srv.port, { protocols = { "chat" }, deflate = {
        serverNoContextTakeover = true, clientNoContextTakeover = true,
        serverMaxWindowBits = 11, clientMaxWindowBits = 10 } })
      check_client_report(r, "node", out, err)
      local answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; " ..
        "server_max_window_bits=11"
      assert.equal(answer, r["c1.extensions"])
      assert.equal(answer, seen["/c1"].extensions)
      assert.equal('{"server_no_context_takeover":true,"client_no_context_takeover":true,' ..
        '"server_max_window_bits":11,"client_max_window_bits":10}', r["c1.negotiated"])
      assert.is_true(tonumber(r["c1.big_text_wire_in"]) < MiB / 4, "we sent " .. r["c1.big_text_wire_in"])
      check_our_server_saw(seen, "node")
    end, LIMIT)
  end)

  -- (our server declined server_max_window_bits=8, thinking zlib's deflate could not keep to
  -- it: ws_conformance_spec)
  it("ws client with serverMaxWindowBits 8 and clientMaxWindowBits 8 <-> our server", function()
    run(function()
      local srv, seen = echo_server { protocols = { "chat" } }
      local _g <close> = guard(srv)
      local r, out, err = node_client(srv.port, { protocols = { "chat" }, deflate = {
        serverMaxWindowBits = 8, clientMaxWindowBits = 8 } })
      check_client_report(r, "node", out, err)
      assert.equal("permessage-deflate; server_max_window_bits=8", r["c1.extensions"])
      assert.equal("permessage-deflate; server_max_window_bits=8", seen["/c1"].extensions)
      assert.is_true(tonumber(r["c1.big_text_wire_in"]) < MiB / 8, "we sent " .. r["c1.big_text_wire_in"])
      check_our_server_saw(seen, "node")
    end, LIMIT)
  end)

  it("ws client <-> our server asking for no context takeover itself, and one with deflate = false", function()
    run(function()
      local srv, seen = echo_server { protocols = { "chat" },
        deflate = { server_no_context_takeover = true, client_no_context_takeover = true } }
      local _g <close> = guard(srv)
      local r, out, err = node_client(srv.port, { protocols = { "chat" } })
      check_client_report(r, "node", out, err)
      assert.equal("permessage-deflate; server_no_context_takeover; client_no_context_takeover", r["c1.extensions"])
      assert.equal('{"server_no_context_takeover":true,"client_no_context_takeover":true}', r["c1.negotiated"])
      check_our_server_saw(seen, "node")

      local srv2, seen2 = echo_server { protocols = { "chat" }, deflate = false }
      local _g2 <close> = guard(srv2)
      r, out, err = node_client(srv2.port, { protocols = { "chat" } })
      check_client_report(r, "node", out, err)
      assert.same({ "", "" }, { r["c1.extensions"], r["c1.negotiated"] })
      assert.is_true(tonumber(r["c1.big_text_wire_in"]) > MiB, "we sent " .. r["c1.big_text_wire_in"])
      check_our_server_saw(seen2, "node")
    end, LIMIT)
  end)
end)

describe("WebSocket broadcast interop with node's ws:", function()
  before_each(need_node)   -- a missing peer fails each test, saying how to install it

  it("one broadcast reaches ws clients with different permessage-deflate parameters and decodes in all: " ..
     "shared frames for no-context-takeover receivers, per-connection ones for the others", function()
    run(function()
      need_node()
      local configs = {
        { serverNoContextTakeover = true, serverMaxWindowBits = 9 },
        { serverNoContextTakeover = true, serverMaxWindowBits = 9 },
        { serverNoContextTakeover = true, serverMaxWindowBits = 12 },
        { serverNoContextTakeover = true },
        true,
        { clientNoContextTakeover = true, serverMaxWindowBits = 10 },
        false,
      }
      local answers = {
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=9",
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=9",
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=12",
        "permessage-deflate; server_no_context_takeover",
        "permessage-deflate",
        "permessage-deflate; client_no_context_takeover; server_max_window_bits=10",
        "",
      }
      local K = #configs
      local messages = {
        { "short", "text" },
        { helper.pattern(1024), "text" },
        { helper.pattern(64 * 1024), "text" },
        { helper.pattern(64 * 1024), "text" },   -- again: context takeover refers back
        { far_repeats(3200, 6, 7), "text" },     -- repeats beyond a 9..12-bit window
        { random_bytes(200 * 1024, 11), "binary" },
        { UNICODE:rep(40), "text" },
      }
      local conns, got, n = {}, {}, 0
      local srv = serve(function(req)
        local i = assert(math.tointeger(tonumber(req:query().i)))
        local ws = assert(req:websocket {})
        conns[i], got[i] = ws, {}
        n = n + 1
        for msg, kind in ws:messages() do got[i][#got[i] + 1] = { msg, kind } end
        got[i].ending = { ws.close_code, ws.close_reason }
      end)
      local _g <close> = guard(srv)
      local done, code, out, err = false, nil, nil, nil
      mw.spawn(function()
        code, out, err = procs.shell(("%s %s %s %s %d"):format(procs.NODE, quote(PEERS .. "/node_echoers.js"),
          quote(("ws://127.0.0.1:%d/b"):format(srv.port)), quote(json(configs)), #messages), 40)
        done = true
      end)
      assert.is_true(procs.wait_for(function() return n == K or done end, 10), "clients connected: " .. n)
      assert.equal(K, n, ("the clients went away: %s %s %s"):format(tostring(code), tostring(out), tostring(err)))
      for _, m in ipairs(messages) do
        assert.equal(K, mw.websocket.broadcast(conns, m[1], m[2]))
      end
      assert.is_true(procs.wait_for(function() return done end, 30), "node_echoers.js did not finish")
      local r = procs.kv(out)
      local context = ("\nnode_echoers.js (exit %s) said:\n%s\n%s"):format(tostring(code), out, err)
      assert.equal(0, code, context)
      assert.equal("1", r.done, context)
      assert.is_true(procs.wait_for(function()
        for i = 1, K do if not got[i].ending then return false end end
        return true
      end), "handlers still running")
      for i = 1, K do
        assert.equal(answers[i], conns[i].extensions)
        assert.equal(answers[i], r["c" .. i .. ".extensions"])
        assert.equal(#messages, #got[i], "client " .. i .. " echoed " .. #got[i] .. " messages")
        for j, m in ipairs(messages) do
          assert.equal(m[2], got[i][j][2])
          assert.is_true(got[i][j][1] == m[1], ("client %d, message %d (%d bytes): echoed %d bytes"):format(i, j,
            #m[1], #got[i][j][1]))
        end
        assert.same({ 1000, "echoed" }, got[i].ending)
      end
      assert.same({}, errors)
    end, LIMIT)
  end)
end)

---------------------------------------------------------------------------------------------
-- headless Chromium: the chat demo

local function png_size(data)
  if not data or data:sub(1, 8) ~= "\137PNG\r\n\26\n" or data:sub(13, 16) ~= "IHDR" then return nil end
  return string.unpack(">I4I4", data, 17)
end

describe("WebSocket interop with headless Chromium:", function()
  it("two pages join the chat demo, one types messages (short, and long enough to be compressed), " ..
     "the other shows them; a screenshot", function()
    need_chromium()
    run(function()
      local saved = package.path
      package.path = procs.root .. "/examples/chat/?.lua;" .. package.path
      local chat = require "chat"
      package.path = saved
      local app = http.router()
      chat.install(app)
      local srv = serve(app)
      local _g <close> = guard(srv)
      local shot = procs.root .. "/build/chat-screenshot.png"
      os.remove(shot)
      local code, out, err = procs.shell(("env MW_CHROMIUM=%s %s %s %s %s"):format(quote(procs.CHROMIUM), procs.NODE,
        quote(PEERS .. "/chat_browser.js"),
        quote("http://127.0.0.1:" .. srv.port), quote(shot)), 50)
      local r = procs.kv(out)
      local context = ("\nchat_browser.js (exit %s) said:\n%s\n%s"):format(tostring(code), out, err)
      assert.equal(0, code, "the browser run failed" .. context)
      assert.equal("1", r.done, context)
      -- Chromium negotiated the subprotocol and permessage-deflate with our server
      assert.equal("connected as alice (protocol chat, extensions: permessage-deflate)", r["alice.status"], context)
      assert.equal("connected as bob (protocol chat, extensions: permessage-deflate)", r["bob.status"], context)
      local long = "alice: a longer one: " .. ("the quick brown fox jumps over the lazy dog; "):rep(8):sub(1, -2)
      assert.equal("* bob joined (2 online) | alice: hello from alice ✓ | " .. long, r["bob.log"], context)
      assert.equal("* alice joined (1 online) | * bob joined (2 online) | alice: hello from alice ✓ | " ..
        long .. " | * bob left (1 online)", r["alice.log"], context)
      assert.equal("", r["alice.input_after_send"])
      -- the screenshot: a PNG of the page, of a real size
      local data = procs.readfile(shot)
      assert.is_truthy(data, "no screenshot at " .. shot)
      local w, h = png_size(data)
      assert.is_truthy(w, "not a PNG: " .. shot)
      assert.is_true(w >= 400 and h >= 300, ("screenshot is %sx%s"):format(w, h))
      assert.is_true(#data > 5000, "screenshot of only " .. #data .. " bytes")
      -- the browser is gone: every connection it had ended, the handlers too
      assert.is_true(procs.wait_for(function() return srv:connections() == 0 end, 10),
        "connections left: " .. srv:connections())
      assert.same({}, errors)
    end, 60)
  end)
end)
