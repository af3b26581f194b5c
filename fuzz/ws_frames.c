/* libFuzzer target: the WebSocket frame parser (src/ws.c) end to end, and the raw inflater
 * (src/zlib.c). The first input byte picks the role and options; the rest is written into
 * one end of a socket pair as a byte stream of frames, and a ws_conn on the other end reads
 * frames with receive_frame exactly as the connection does, until a protocol error, the end
 * of input, or a bounded number of frames. What comes out is checked: delivered text is
 * valid UTF-8, messages respect max_message, control payloads are at most 125 bytes, close
 * codes are valid, protocol errors carry 1002/1007/1009/1011. Each delivered message is
 * then framed again with encode (and compressed with deflate when negotiated) and the
 * result is checked by decoding it in Lua. The same bytes also go through
 * inflater("raw"):decompress(data, 65536), whole and in two pieces.
 *
 * Selector byte: bit 0 client role (peer frames unmasked), bit 1 permessage-deflate,
 * bits 2-4 rx window bits - 8, bit 5 rx_no_context_takeover, bit 6 max_frame = 1024,
 * bit 7 tx_no_context_takeover.
 *
 * Built with the core sources by `make fuzz` (clang, -fsanitize=fuzzer,address,undefined). */
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
    "local MAX = 65536\n"
    "local TAIL = '\\0\\0\\xff\\xff'\n"
    "local function valid_code(c)\n"
    "  return (c >= 1000 and c <= 1003) or (c >= 1007 and c <= 1014) or (c >= 3000 and c <= 4999)\n"
    "end\n"
    "local OPS = { text = 1, binary = 2, ping = 9, pong = 10 }\n"
    /* decodes one frame produced by encode (header, payload) and returns op, fin, rsv1, data */
    "local function decode(h, p, client)\n"
    "  local b0, b1 = h:byte(1, 2)\n"
    "  local n, pos = b1 & 127, 3\n"
    "  if n == 126 then n, pos = string.unpack('>I2', h, 3)\n"
    "  elseif n == 127 then n, pos = string.unpack('>I8', h, 3) end\n"
    "  assert(n == #p, 'encode: length field does not match the payload')\n"
    "  assert((b1 & 128 ~= 0) == client, 'encode: wrong mask bit for the role')\n"
    "  if n < 126 then assert(b1 & 127 < 126, 'encode: non-minimal length') end\n"
    "  if n >= 126 and n < 65536 then assert(b1 & 127 == 126, 'encode: non-minimal length') end\n"
    "  if client then\n"
    "    assert(#h == pos + 3, 'encode: header length')\n"
    "    local key = { h:byte(pos, pos + 3) }\n"
    "    local out = {}\n"
    "    for i = 1, #p do out[i] = string.char(p:byte(i) ~ key[(i - 1) % 4 + 1]) end\n"
    "    p = table.concat(out)\n"
    "  else\n"
    "    assert(#h == pos - 1, 'encode: header length')\n"
    "  end\n"
    "  return b0 & 15, b0 & 128 ~= 0, b0 & 64 ~= 0, p\n"
    "end\n"
    "return function(data)\n"
    "  local sel = data:byte(1) or 0\n"
    "  local stream = data:sub(2)\n"
    "  local client = sel & 1 == 1\n"
    "  local opts = { client = client, max_message = MAX }\n"
    "  if sel & 2 == 2 then\n"
    "    opts.deflate = { rx_bits = 8 + ((sel >> 2) & 7), tx_bits = 15,\n"
    "                     rx_no_context_takeover = sel & 32 == 32, tx_no_context_takeover = sel & 128 == 128 }\n"
    "  end\n"
    "  if sel & 64 == 64 then opts.max_frame = 1024 end\n"
    "  core.run(function()\n"
    "    local a, b = core.unix.pair()\n"
    "    core.spawn(function() b:write(stream) b:shutdown('write') end)\n"
    "    local wc = core.ws_conn(a, opts)\n"
    "    local inf = opts.deflate and core.inflater('raw', 15)\n"
    "    for _ = 1, 1024 do\n"
    "      local p, kind, code, reason = wc:receive_frame(1)\n"
    "      if p == nil then\n"
    "        if math.type(code) == 'integer' then\n"
    "          assert(code == 1002 or code == 1007 or code == 1009 or code == 1011, 'close code ' .. code)\n"
    "          assert(type(kind) == 'string')\n"
    "        else\n"
    "          assert(code == 'closed', 'receive_frame: ' .. tostring(kind) .. ' ' .. tostring(code))\n"
    "        end\n"
    "        break\n"
    "      end\n"
    "      assert(type(p) == 'string')\n"
    "      if kind == 'text' or kind == 'binary' then\n"
    "        assert(#p <= MAX, 'message above max_message')\n"
    "        if kind == 'text' then assert(core.utf8_valid(p), 'invalid UTF-8 delivered as text') end\n"
    "      elseif kind == 'ping' or kind == 'pong' then\n"
    "        assert(#p <= 125, 'control payload above 125 bytes')\n"
    "      elseif kind == 'close' then\n"
    "        assert(#p <= 125 and #p ~= 1, 'close payload size')\n"
    "        assert((#p == 0 and code == 1005) or (#p >= 2 and valid_code(code)), 'close code')\n"
    "        assert(type(reason) == 'string' and core.utf8_valid(reason), 'close reason')\n"
    "        assert(reason == p:sub(3), 'close reason and payload differ')\n"
    "      else\n"
    "        error('unknown frame kind ' .. tostring(kind))\n"
    "      end\n"
    /* the send side: frame what came in and decode it again */
    "      if kind ~= 'close' then\n"
    "        local h, q = wc:encode(OPS[kind], p, true, false)\n"
    "        local op, fin, rsv1, back = decode(h, q, client)\n"
    "        assert(op == OPS[kind] and fin and not rsv1 and back == p, 'encode round trip')\n"
    "        if inf and (kind == 'text' or kind == 'binary') then\n"
    "          local z = wc:deflate(p)\n"
    "          local out = assert(inf:decompress(z .. TAIL, MAX + 1))\n"
    "          assert(out == p, 'deflate round trip')\n"
    "          if opts.deflate.tx_no_context_takeover then inf = core.inflater('raw', 15) end\n"
    "        end\n"
    "      end\n"
    "    end\n"
    "    a:close() b:close()\n"
    "  end)\n"
    /* the raw inflater on the same bytes: whole, then in two pieces */
    "  local out, err, code = core.inflater('raw'):decompress(stream, MAX)\n"
    "  if out then assert(#out <= MAX) else assert(code == 'toolarge' or code == 'zlib', tostring(err)) end\n"
    "  local cut = #stream // 2\n"
    "  local i2 = core.inflater('raw', 8 + (sel & 7))\n"
    "  local o1, _, c1 = i2:decompress(stream:sub(1, cut), MAX)\n"
    "  if o1 then\n"
    "    local o2, _, c2 = i2:decompress(stream:sub(cut + 1), MAX)\n"
    "    if not o2 then assert(c2 == 'toolarge' or c2 == 'zlib') end\n"
    "  else\n"
    "    assert(c1 == 'toolarge' or c1 == 'zlib')\n"
    "  end\n"
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
        /* an assertion in the harness: the parser delivered something it must not */
        fprintf(stderr, "harness failure: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}
