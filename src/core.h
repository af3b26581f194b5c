/* core: how each layer registers its Lua functions into the module table on top of the
 * stack (luaopen_moonwire_core calls them in layer order). The rest of each layer's C
 * contract is in its own header; these files have no other public symbols. */
#ifndef MW_CORE_H
#define MW_CORE_H

#include <lua.h>
#include <lauxlib.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

void mw_alloc_install(lua_State *L);   /* alloc.c: the size-class allocator for the state */
int mw_alloc_name(lua_State *L);       /* alloc.c: core.allocator() */
void mw_fs_open(lua_State *L);      /* fs.c: stat, realpath */
void mw_http_open(lua_State *L);    /* http.c: HttpConn, head builders */
void mw_zlib_open(lua_State *L);    /* zlib.c: gzip/gunzip, deflater/inflater */
void mw_ws_open(lua_State *L);      /* ws.c: WsConn, accept key, random, utf8_valid */
void mw_tls_open(lua_State *L);     /* tls.c: contexts; starttls/tls_info/set_tls */
void mw_hdr_open(lua_State *L);
void mw_redis_open(lua_State *L, int rtidx);   /* redis.c: RESP codec, decoder, RespConn */     /* hdr.c: histograms */
void mw_thread_open(lua_State *L, int rtidx);  /* thread.c: threads, shared counters */

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

#endif
