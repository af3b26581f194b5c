/* libFuzzer target: the HTTP request parser glue (src/http.c) end to end. Each input is
 * written into one end of a socket pair; the server side reads requests, bodies and
 * trailers from the other end exactly as the server does (empty lines before a request
 * line, chunked bodies with extensions and trailers, declined upgrades followed by the next
 * request: see the seeds in fuzz/corpus/http), until an error or the end of input. Built
 * with the core sources by `make fuzz` (clang, -fsanitize=fuzzer,address,undefined). */
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
    "return function(data)\n"
    "  core.run(function()\n"
    "    local a, b = core.unix.pair()\n"
    "    core.spawn(function() b:write(data) b:shutdown('write') end)\n"
    "    local hc = core.http_conn(a, { request_line = 1024, head = 4096, headers = 20 }, {})\n"
    "    for _ = 1, 64 do\n"
    "      local req, err = hc:read_request(1, 1)\n"
    "      if not req then break end\n"
    "      -- (the method and the path: array slots 6 and 9, see lua/moonwire/http/request.lua)\n"
    "      assert(type(req[6]) == 'string' and type(req[9]) == 'string' and type(req[7]) == 'string')\n"
    "      for k, v in pairs(hc:headers_of(req)) do\n"
    "        assert(k == k:lower() and type(v) == 'string' and not v:find('[\\r\\n]'))\n"
    "      end\n"
    "      local mode = #data % 3 == 0 and 'chunk' or 'all'\n"
    "      local body = hc:read_body(mode, 65536, 1)\n"
    "      while mode == 'chunk' and body do body = hc:read_body('chunk', -1, 1) end\n"
    "      local _, done = hc:state()\n"
    "      if not done then break end\n"
    "      -- trailers of a chunked body (checked with the head's line rules)\n"
    "      for k, v in pairs(hc:trailers() or {}) do\n"
    "        assert(k == k:lower() and k ~= '' and not v:find('[\\r\\n]'))\n"
    "      end\n"
    "    end\n"
    "    a:close() b:close()\n"
    "  end)\n"
    "end\n";

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    L = luaL_newstate();
    luaL_openlibs(L);
    luaL_requiref(L, "moonwire.core", luaopen_moonwire_core, 0);
    if (luaL_loadstring(L, harness) != LUA_OK) abort();
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
        /* an assertion in the harness: the glue produced a malformed request */
        fprintf(stderr, "harness failure: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}
