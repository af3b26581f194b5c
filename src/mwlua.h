/* mwlua: small Lua C API helpers that several layers share (how hot paths tell their own
 * userdata). Below every layer: it includes only Lua's headers, so any file may use it
 * without reaching up to the module's entry (core.c). */
#ifndef MW_MWLUA_H
#define MW_MWLUA_H

#include <lua.h>
#include <lauxlib.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The full userdata at idx when it has `size` bytes and the 64-bit `magic` at byte `off`,
 * else NULL: how the hottest paths tell their own objects, two API calls cheaper than a
 * metatable comparison (a userdata of another kind has another size, or not that number
 * there). */
static inline void *mw_udata_magic(lua_State *L, int idx, size_t size, size_t off, uint64_t magic)
{
    char *p = lua_touserdata(L, idx);
    if (p && lua_rawlen(L, idx) == size) {
        uint64_t m;
        memcpy(&m, p + off, sizeof m);
        if (m == magic) return p;
    }
    return NULL;
}

/* luaL_checkudata for hot paths: the expected metatable is the C function's upvalue `up`,
 * so the check is a pointer comparison instead of a registry lookup by name; anything
 * else goes through luaL_checkudata (and its error message). */
static inline void *mw_checkudata_up(lua_State *L, int idx, int up, const char *tname)
{
    if (lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
        int same = lua_rawequal(L, -1, lua_upvalueindex(up));
        lua_pop(L, 1);
        if (same) return lua_touserdata(L, idx);
    }
    return luaL_checkudata(L, idx, tname);
}

/* The C fast paths with a Lua implementation for everything else (res:send and res:header
 * on HTTP/1.1 and HTTP/2, ws:send) leave through these. */

/* A continuation: the results are the values above stack slot ctx. */
static inline int mw_results_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    return lua_gettop(L) - (int)ctx;
}

/* Calls upvalue `up` with the first n values of the stack (the rest dropped) and returns
 * what it returns; it may yield. */
static inline int mw_call_upvalue(lua_State *L, int up, int n)
{
    lua_settop(L, n);
    lua_pushvalue(L, lua_upvalueindex(up));
    lua_insert(L, 1);
    lua_callk(L, n, LUA_MULTRET, 0, mw_results_k);
    return mw_results_k(L, LUA_OK, 0);
}

/* Pushes t[upvalue up] (raw; t a positive index) and returns its type. */
static inline int mw_rawget_upvalue(lua_State *L, int t, int up)
{
    lua_pushvalue(L, lua_upvalueindex(up));
    return lua_rawget(L, t);
}

#endif
