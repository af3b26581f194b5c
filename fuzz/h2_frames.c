/* libFuzzer target: the HTTP/2 session glue (src/h2.c) end to end. Each input is a byte
 * stream of frames a client sends after its preface: the harness writes the client preface
 * and the input into one end of a socket pair, then shuts that end's write side down; the
 * other end is an H2Conn (core.h2_server, short timeouts, small windows and limits) served
 * with h2:run(fn) as lua/moonwire/http/h2.lua serves it (each request stream's handler in a
 * worker, cancelled when its stream is reset), until the connection is over and every
 * handler has ended. A task drains what the server sends.
 * Reads and writes wait at most 10 ms, so an input that makes a handler wait costs that.
 *
 * Each request's handler picks what it does from a selector byte of the request (the last
 * byte of the target xor 7 * its length): bits 0-1 read the body ("all" with a limit of
 * 8192, or 1000 with bit 4; "chunk"; "discard"; not at all), bits 2-3 answer (respond with
 * a whole body; respond then write pieces and end; the same with 204; reset the stream),
 * bits 4-5 the body size, bit 6 a 103 Early Hints first, bit 7 trailers. A PATCH request
 * also shuts the connection down (gracefully when its target's length is even). An input of
 * even length has the option park_hpack on (its idle moments park the HPACK table). A frame of
 * type 0xEE in the input is a pause (not sent): the client waits there until the server has
 * been idle, trimmed and stowed its session (and parked its HPACK table), so that the frames
 * after it (a SETTINGS ACK, the next request) meet a stowed, parked session. Everything an
 * H2Conn or H2Stream method returns is checked (request fields are strings, header names
 * lower case, values without NUL/CR/LF, a body read whole matches its content-length,
 * failures are nil, msg, code), and a raise in a handler fails the input.
 *
 * Seeds: fuzz/corpus/h2 (make-seeds.py there writes them). Built with the core sources by
 * `make fuzz` (clang, -fsanitize=fuzzer,address,undefined). */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_moonwire_core(lua_State *L);

static lua_State *L;
static int fn_ref;

static const char harness[] =
    "local core = ...\n"
    "local PREFACE = 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n'\n"
    "local SETTINGS = { max_streams = 8, stream_window = 8192, conn_window = 100000, header_fields = 32,\n"
    "  header_bytes = 4096, hwm = 16384, out_hwm = 2048, head_timeout = 0.5, idle_timeout = 0.5,\n"
    "  write_timeout = 0.01, settings_timeout = 0.5, glitches = 64, connect_protocol = true,\n"
    "  trim_after = 0 }   -- every idle moment gives the session's pages back (h2mem.c)\n"
    "local MODES = { 'all', 'chunk', 'discard', 'none' }\n"
    "local STOPS = { cancelled = true, reset = true, closed = true, timeout = true }\n"
    "local HEAD = { 'content-type', 'text/plain', 'X-Fuzz', 'yes', 'Connection', 'close' }\n"
    "local TRAILERS = { 'x-checksum', 'abc', 'X-Done', '1' }\n"
    "local function fail_ok(v, msg, code)\n"
    "  -- a failed call: nil, message, code (a stream reset, the connection gone, cancelled)\n"
    "  assert(v == nil and type(msg) == 'string' and code ~= nil, 'bad failure: ' .. tostring(msg))\n"
    "  return code\n"
    "end\n"
    "local function check_fields(t)\n"
    "  for k, v in pairs(t) do\n"
    "    assert(type(k) == 'string' and k ~= '' and k == k:lower() and k:sub(1, 1) ~= ':', 'bad name')\n"
    "    assert(type(v) == 'string' and not v:find('[%z\\r\\n]'), 'bad value')\n"
    "  end\n"
    "end\n"
    "-- the handler of one request: sel (a byte the input controls) picks what it does\n"
    "local function handler(st, sel, sid, method, target, path, has_body)\n"
    "  assert(type(method) == 'string' and type(target) == 'string' and type(path) == 'string')\n"
    "  assert(st:id() == sid)\n"
    "  local authority, scheme, protocol = st:pseudo(':authority'), st:pseudo(':scheme'), st:pseudo(':protocol')\n"
    "  assert(authority == nil or type(authority) == 'string')\n"
    "  assert(scheme == nil or type(scheme) == 'string')\n"
    "  assert(protocol == nil or type(protocol) == 'string')\n"
    "  assert(type(has_body) == 'boolean' and path ~= '')\n"
    "  assert(math.type(st:id()) == 'integer' and st:id() % 2 == 1)\n"
    "  assert(st:socket() ~= nil)\n"
    "  local req = {}\n"
    "  check_fields(st:headers_of(req))\n"
    "  for k, list in pairs(req._multi or {}) do\n"
    "    assert(type(k) == 'string' and #list >= 2)\n"
    "    for _, v in ipairs(list) do assert(type(v) == 'string') end\n"
    "  end\n"
    "  local hd, done, expect, upgrade, clen, chunked = st:state()\n"
    "  assert(hd == true and type(done) == 'boolean' and expect == false and upgrade == false and chunked == false)\n"
    "  assert(clen == nil or (math.type(clen) == 'integer' and clen >= 0))\n"
    "  local mode = MODES[sel % 4 + 1]\n"
    "  local got = 0   -- body bytes read; -1: the read ended by a reset, cancel or timeout\n"
    "  if sel & 64 ~= 0 then\n"
    "    local ok, msg, code = st:respond(103, { 'link', '</a>; rel=preload' }, 1, 1)\n"
    "    if not ok then fail_ok(ok, msg, code) end\n"
    "  end\n"
    "  if mode == 'all' then\n"
    "    local max = sel & 16 ~= 0 and 1000 or 8192\n"
    "    local body, msg, code = st:read_body('all', max, 0.01)\n"
    "    if body then\n"
    "      assert(type(body) == 'string' and #body <= max)\n"
    "      if clen then assert(#body == clen, 'body length differs from content-length') end\n"
    "      got = #body\n"
    "    elseif STOPS[code] then got = -1\n"
    "    else assert(body == nil and (code == 400 or code == 408 or code == 413), 'read_body: ' .. tostring(msg)) end\n"
    "  elseif mode == 'chunk' then\n"
    "    for _ = 1, 10000 do\n"
    "      local piece, msg, code = st:read_body('chunk', -1, 0.01)\n"
    "      if piece == nil then\n"
    "        if msg ~= nil then\n"
    "          if STOPS[code] then got = -1\n"
    "          else assert(code == 400 or code == 408, 'read_body chunk: ' .. tostring(msg)) end\n"
    "        elseif clen then\n"
    "          assert(got == clen, 'chunked body length differs from content-length')\n"
    "        end\n"
    "        break\n"
    "      end\n"
    "      assert(type(piece) == 'string' and #piece > 0)\n"
    "      got = got + #piece\n"
    "    end\n"
    "  elseif mode == 'discard' then\n"
    "    local ok, msg, code = st:read_body('discard', -1, 0.01)\n"
    "    if ok then assert(ok == true) elseif STOPS[code] then got = -1\n"
    "    else assert(code == 400 or code == 408, 'read_body discard: ' .. tostring(msg)) end\n"
    "  end\n"
    "  local tr = st:trailers()\n"
    "  if tr then check_fields(tr) end\n"
    "  local how = (sel >> 2) & 3\n"
    "  if sel & 128 ~= 0 then st:set_trailers(TRAILERS, 2) end\n"
    "  if how == 0 then\n"
    "    local body = ('%s %s %d\\n'):format(method, path, got):rep(1 + (sel >> 4 & 3) * 300)\n"
    "    local ok, msg, code = st:respond(200, HEAD, 3, 1, body, true, 'fuzz', #body)\n"
    "    if not ok then fail_ok(ok, msg, code) end\n"
    "  elseif how == 1 or how == 2 then\n"
    "    local ok, msg, code = st:respond(how == 1 and 200 or 204, HEAD, 2, 1, nil, false, nil, -1)\n"
    "    if ok then\n"
    "      for i = 1, 1 + (sel >> 4 & 3) * 4 do\n"
    "        ok, msg, code = st:write(('chunk %d '):format(i):rep(100))\n"
    "        if not ok then fail_ok(ok, msg, code) break end\n"
    "      end\n"
    "      if ok then\n"
    "        ok, msg, code = st:write('', true)\n"
    "        if not ok then fail_ok(ok, msg, code) end\n"
    "      end\n"
    "    else\n"
    "      fail_ok(ok, msg, code)\n"
    "    end\n"
    "  else\n"
    "    st:reset(sel & 16 ~= 0 and 8 or nil)\n"
    "  end\n"
    "  assert(type(st:closed()) == 'boolean')\n"
    "end\n"
    "\n"
    "-- h2:stats(), or nil before the connection is made or once it is closed\n"
    "local function stats(h2)\n"
    "  if not h2 then return nil end\n"
    "  local ok, s = pcall(h2.stats, h2)\n"
    "  return ok and s or nil\n"
    "end\n"
    "\n"
    "return function(data)\n"
    "  local failures = {}\n"
    "  core.run(function()\n"
    "    local a, b = core.unix.pair()\n"
    "    local h2\n"
    "    local writer = core.spawn(function()\n"
    "      -- a frame of type 0xEE (whole, at a frame boundary) is a pause: what comes before it\n"
    "      -- is written, then the client waits until the server has been idle (its trim and\n"
    "      -- its session stowed, and with park_hpack its parking SETTINGS, done); the marker\n"
    "      -- itself is not sent\n"
    "      local from, pos = 1, 1\n"
    "      b:write(PREFACE)\n"
    "      while pos + 8 <= #data do\n"
    "        local len = string.unpack('>I3', data, pos)\n"
    "        if data:byte(pos + 3) == 0xEE and pos + 8 + len <= #data then\n"
    "          if pos > from then b:write(data:sub(from, pos - 1)) end\n"
    "          local s0 = stats(h2)\n"
    "          local t0 = s0 and s0.trims or 0\n"
    "          for _ = 1, 30 do\n"
    "            core.sleep(0.001)\n"
    "            if h2 then\n"
    "              local s = stats(h2)\n"
    "              if not s or (s.handlers == 0 and s.trims > t0) then break end\n"
    "            end\n"
    "          end\n"
    "          from = pos + 9 + len\n"
    "        end\n"
    "        pos = pos + 9 + len\n"
    "      end\n"
    "      if from <= #data then b:write(data:sub(from)) end\n"
    "      for _ = 1, 16 do core.yield() end\n"
    "      b:shutdown('write')\n"
    "    end)\n"
    "    local drain = core.spawn(function()\n"
    "      for _ = 1, 100000 do\n"
    "        local got = b:recv(65536, 2)\n"
    "        if not got then break end\n"
    "      end\n"
    "    end)\n"
    "    assert(core.h2_preface(a, 1) == true)\n"
    "    -- HPACK parking (park_hpack: the table emptied when idle, h2mem's area given back)\n"
    "    -- on for inputs of even length\n"
    "    SETTINGS.park_hpack = #data % 2 == 0\n"
    "    h2 = core.h2_server(a, SETTINGS, {})\n"
    "    local seen = {}\n"
    "    local function serve(h2c, st, method, target, path, has_body)\n"
    "      local sel = (target:byte(-1) or 0) ~ (#target * 7)\n"
    "      local id = st:id()\n"
    "      assert(not seen[id], 'a stream id twice')\n"
    "      seen[id] = true\n"
    "      local s = h2c:stats()\n"
    "      assert(s.handlers >= 1 and s.handlers <= SETTINGS.max_streams)\n"
    "      assert(h2c:idle() == false)\n"
    "      -- a server closing: gracefully (in-flight streams finish) or at once\n"
    "      if method == 'PATCH' then h2c:shutdown(#target % 2 == 0) end\n"
    "      local ok, err = pcall(handler, st, sel, id, method, target, path, has_body)\n"
    "      st:done()\n"
    "      if not ok then failures[#failures + 1] = tostring(err) end\n"
    "    end\n"
    "    local ok, msg, code = h2:run(serve, h2)\n"
    "    assert(ok == nil and type(msg) == 'string' and type(code) == 'string', 'h2:run: ' .. tostring(ok))\n"
    "    assert(h2:stats().handlers == 0, 'h2:run returned with handlers running')\n"
    "    a:close()\n"
    "    writer:cancel() writer:join()\n"
    "    drain:join()\n"
    "    b:close()\n"
    "  end)\n"
    "  if #failures > 0 then error(table.concat(failures, '\\n'), 0) end\n"
    "end\n";

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    L = luaL_newstate();
    luaL_openlibs(L);
    luaL_requiref(L, "moonwire.core", luaopen_moonwire_core, 0);
    if (luaL_loadstring(L, harness) != LUA_OK) {
        fprintf(stderr, "%s\n", lua_tostring(L, -1));
        abort();
    }
    lua_insert(L, -2);  /* chunk, core */
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        fprintf(stderr, "%s\n", lua_tostring(L, -1));
        abort();
    }
    fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, fn_ref);
    lua_pushlstring(L, (const char *)data, size);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        /* a check in the harness failed: the glue returned something it must not */
        fprintf(stderr, "harness failure: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_gc(L, LUA_GCCOLLECT, 0);
    return 0;
}
