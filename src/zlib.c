/* zlib: one-shot gzip/gunzip for HTTP bodies (the server's compression, the client's
 * decoding). Output sizes are bounded by the caller's limit, so a small hostile input
 * cannot expand into unbounded memory. */
#include "sched.h"

#include <string.h>
#include <zlib.h>

/* gzip(data [, level]) -> compressed string */
static int l_gzip(lua_State *L)
{
    size_t n;
    const char *in = luaL_checklstring(L, 1, &n);
    int level = (int)luaL_optinteger(L, 2, 6);
    luaL_argcheck(L, level >= 0 && level <= 9, 2, "level must be 0..9");
    z_stream z;
    memset(&z, 0, sizeof z);
    if (deflateInit2(&z, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        return luaL_error(L, "deflateInit2 failed");
    uLong bound = deflateBound(&z, (uLong)n);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, bound);
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)n;
    z.next_out = (Bytef *)out;
    z.avail_out = (uInt)bound;
    int r = deflate(&z, Z_FINISH);
    size_t produced = bound - z.avail_out;
    deflateEnd(&z);
    if (r != Z_STREAM_END) return luaL_error(L, "deflate failed");
    luaL_pushresultsize(&b, produced);
    return 1;
}

/* gunzip(data [, max [, raw]]) -> string | nil, err, "zlib"; gzip or zlib framing
 * (auto-detected), or raw deflate when raw is true. At most max bytes of output. */
static int l_gunzip(lua_State *L)
{
    size_t n;
    const char *in = luaL_checklstring(L, 1, &n);
    lua_Integer max = luaL_optinteger(L, 2, (lua_Integer)64 * 1024 * 1024);
    int raw = lua_toboolean(L, 3);
    z_stream z;
    memset(&z, 0, sizeof z);
    if (inflateInit2(&z, raw ? -15 : 15 + 32) != Z_OK) return luaL_error(L, "inflateInit2 failed");
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)n;
    size_t total = 0;
    int r;
    do {
        char *out = luaL_prepbuffsize(&b, 16384);
        z.next_out = (Bytef *)out;
        z.avail_out = 16384;
        r = inflate(&z, Z_NO_FLUSH);
        size_t got = 16384 - z.avail_out;
        luaL_addsize(&b, got);
        total += got;
        if (total > (size_t)max) {
            inflateEnd(&z);
            return mw_pushfail(L, "decompressed data too large", "toolarge");
        }
        if (r == Z_BUF_ERROR && z.avail_in == 0) break;
    } while (r == Z_OK);
    inflateEnd(&z);
    if (r != Z_STREAM_END && !(raw && r == Z_BUF_ERROR))
        return mw_pushfail(L, z.msg ? z.msg : "invalid compressed data", "zlib");
    luaL_pushresult(&b);
    return 1;
}

void mw_zlib_open(lua_State *L)
{
    static const luaL_Reg f[] = { { "gzip", l_gzip }, { "gunzip", l_gunzip }, { NULL, NULL } };
    luaL_setfuncs(L, f, 0);
}
