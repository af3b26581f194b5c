/* zlib: one-shot gzip/gunzip for HTTP bodies (the server's compression, the client's
 * decoding). Output sizes are bounded by the caller's limit, so a small hostile input
 * cannot expand into unbounded memory. */
#include "mwzlib.h"
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


/* ---- streams: deflate/inflate objects (HTTP decoding, WebSocket permessage-deflate) ---- */

#define DEFLATER_MT "moonwire.Deflater"
#define INFLATER_MT "moonwire.Inflater"

/* open: the z_stream is initialised; inflaters: gzip: gzip framing (a stream may be several
 * members, RFC 1952 §2.2); ended: the (last) stream ended, only another member may follow */
typedef struct { z_stream z; int open, gzip, ended; } zbox;

static int zbox_gc_deflate(lua_State *L)
{
    zbox *b = lua_touserdata(L, 1);
    if (b->open) deflateEnd(&b->z);
    b->open = 0;
    return 0;
}

static int zbox_gc_inflate(lua_State *L)
{
    zbox *b = lua_touserdata(L, 1);
    if (b->open) inflateEnd(&b->z);
    b->open = 0;
    return 0;
}

/* Window bits for the framing: "gzip", "zlib", "raw" (negative: raw deflate), or "auto"
 * (inflate only: gzip or zlib). */
static int window_bits(lua_State *L, int idx, int bits, int inflate)
{
    static const char *const kinds[] = { "raw", "zlib", "gzip", "auto", NULL };
    int kind = luaL_checkoption(L, idx, "raw", kinds);
    if (kind == 3 && !inflate) luaL_argerror(L, idx, "'auto' is for inflaters only");
    switch (kind) {
    case 0: return -bits;
    case 1: return bits;
    case 2: return bits + 16;
    default: return bits + 32;
    }
}

/* deflater(framing = "raw", level = 6, window_bits = 15) */
static int l_deflater(lua_State *L)
{
    lua_Integer level = luaL_optinteger(L, 2, 6);
    lua_Integer bits = luaL_optinteger(L, 3, 15);
    luaL_argcheck(L, level >= -1 && level <= 9, 2, "level must be -1..9");
    luaL_argcheck(L, bits >= 8 && bits <= 15, 3, "window bits must be 8..15");
    /* zlib's raw deflate cannot produce an 8-bit window; 9 is what peers accept for 8 */
    int wb = window_bits(L, 1, bits == 8 ? 9 : (int)bits, 0);
    zbox *b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, DEFLATER_MT);
    if (deflateInit2(&b->z, (int)level, Z_DEFLATED, wb, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        return luaL_error(L, "deflateInit2 failed");
    b->open = 1;
    return 1;
}

/* d:compress(data, flush) -> output; flush: "none", "sync", "full", "finish" */
static int d_compress(lua_State *L)
{
    static const char *const modes[] = { "none", "sync", "full", "finish", NULL };
    static const int zmodes[] = { Z_NO_FLUSH, Z_SYNC_FLUSH, Z_FULL_FLUSH, Z_FINISH };
    zbox *b = luaL_checkudata(L, 1, DEFLATER_MT);
    size_t n;
    const char *in = luaL_checklstring(L, 2, &n);
    int flush = zmodes[luaL_checkoption(L, 3, "sync", modes)];
    if (!b->open) return luaL_error(L, "attempt to use a finished deflater");
    luaL_Buffer out;
    luaL_buffinit(L, &out);
    b->z.next_in = (Bytef *)in;
    b->z.avail_in = (uInt)n;
    int r;
    do {
        char *p = luaL_prepbuffsize(&out, 16384);
        b->z.next_out = (Bytef *)p;
        b->z.avail_out = 16384;
        r = deflate(&b->z, flush);
        if (r == Z_STREAM_ERROR) return luaL_error(L, "deflate failed");
        luaL_addsize(&out, 16384 - b->z.avail_out);
    } while (b->z.avail_out == 0 || (flush == Z_FINISH && r != Z_STREAM_END));
    if (flush == Z_FINISH) {
        deflateEnd(&b->z);
        b->open = 0;
    }
    luaL_pushresult(&out);
    return 1;
}

static int d_reset(lua_State *L)
{
    zbox *b = luaL_checkudata(L, 1, DEFLATER_MT);
    if (b->open) deflateReset(&b->z);
    return 0;
}

/* inflater(framing = "raw", window_bits = 15) */
static int l_inflater(lua_State *L)
{
    lua_Integer bits = luaL_optinteger(L, 2, 15);
    luaL_argcheck(L, bits >= 8 && bits <= 15, 2, "window bits must be 8..15");
    int wb = window_bits(L, 1, (int)bits, 1);
    zbox *b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, INFLATER_MT);
    if (inflateInit2(&b->z, wb) != Z_OK) return luaL_error(L, "inflateInit2 failed");
    b->open = 1;
    b->gzip = wb > 15 && wb < 32;
    return 1;
}

/* i:decompress(data, max) -> output [, "end"] | nil, err, code ("toolarge": the output
 * would pass max bytes, checked as it is produced, so a bomb stops early; "zlib": bad data,
 * or data after the end of the stream). "end": the stream has ended with this call's data
 * (a later call may still start another gzip member, then "end" comes again at its end).
 * Gzip framing takes several members one after the other (RFC 1952 §2.2, RFC 9110
 * §8.4.1.3: a body is not cut at the first member's end); anything else after the end is
 * refused rather than dropped, so a truncated decoding never passes for the whole. */
static int i_decompress(lua_State *L)
{
    zbox *b = luaL_checkudata(L, 1, INFLATER_MT);
    size_t n;
    const char *in = luaL_checklstring(L, 2, &n);
    lua_Integer max = luaL_optinteger(L, 3, (lua_Integer)64 * 1024 * 1024);
    if (!b->open) return mw_pushfail(L, "data after the end of the compressed stream", "zlib");
    luaL_Buffer out;
    luaL_buffinit(L, &out);
    b->z.next_in = (Bytef *)in;
    b->z.avail_in = (uInt)n;
    size_t total = 0;
    for (;;) {
        if (b->ended) {
            if (b->z.avail_in == 0) break;
            /* another member starts with the magic 1f 8b (a lone 1f: inflate checks the 8b) */
            const Bytef *next = b->z.next_in;
            if (!b->gzip || next[0] != 0x1f || (b->z.avail_in > 1 && next[1] != 0x8b))
                return mw_pushfail(L, "data after the end of the compressed stream", "zlib");
            inflateReset(&b->z);
            b->ended = 0;
        }
        char *p = luaL_prepbuffsize(&out, 16384);
        b->z.next_out = (Bytef *)p;
        b->z.avail_out = 16384;
        int r = inflate(&b->z, Z_SYNC_FLUSH);
        size_t got = 16384 - b->z.avail_out;
        luaL_addsize(&out, got);
        total += got;
        if (total > (size_t)max) return mw_pushfail(L, "decompressed data too large", "toolarge");
        if (r == Z_STREAM_END) {
            b->ended = 1;
            continue;
        }
        if (r == Z_BUF_ERROR) break;  /* needs more input (or output fully drained) */
        if (r != Z_OK) return mw_pushfail(L, b->z.msg ? b->z.msg : "invalid compressed data", "zlib");
        if (b->z.avail_in == 0 && b->z.avail_out > 0) break;
    }
    luaL_pushresult(&out);
    if (!b->ended) return 1;
    lua_pushliteral(L, "end");
    return 2;
}

static int i_reset(lua_State *L)
{
    zbox *b = luaL_checkudata(L, 1, INFLATER_MT);
    if (b->open) inflateReset(&b->z);
    b->ended = 0;
    return 0;
}

static void mw_zlib_stream_open(lua_State *L)
{
    static const luaL_Reg dm[] = { { "compress", d_compress }, { "reset", d_reset }, { NULL, NULL } };
    static const luaL_Reg im[] = { { "decompress", i_decompress }, { "reset", i_reset }, { NULL, NULL } };
    luaL_newmetatable(L, DEFLATER_MT);
    luaL_newlib(L, dm);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, zbox_gc_deflate);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, INFLATER_MT);
    luaL_newlib(L, im);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, zbox_gc_inflate);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_deflater);
    lua_setfield(L, -2, "deflater");
    lua_pushcfunction(L, l_inflater);
    lua_setfield(L, -2, "inflater");
}

void mw_zlib_open(lua_State *L)
{
    static const luaL_Reg f[] = { { "gzip", l_gzip }, { "gunzip", l_gunzip }, { NULL, NULL } };
    luaL_setfuncs(L, f, 0);
    mw_zlib_stream_open(L);
}
