/* libFuzzer target: the RESP parser (src/resp.c) and the Lua value builder (src/redis.c).
 * The first input byte picks the limits (bits 0-3: max_depth 1..16; bits 4-7: max_bulk
 * 2^(k+2) bytes); the rest is a byte stream of replies. It is parsed three ways, which must
 * agree exactly (every reply's values, then the same final state: the same error or "more
 * bytes needed"): whole; in pieces whose sizes come from a PRNG seeded by the input (the
 * scanner resuming each time, as a connection does); and byte by byte. The walker must end
 * each reply where the scanner said it ends. The same bytes then go through the Lua decoder
 * (core.resp_decoder), whole and byte by byte, which must give as many values.
 *
 * Built with the core sources by `make fuzz` (clang, -fsanitize=fuzzer,address,undefined). */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "../src/resp.h"

int luaopen_moonwire_core(lua_State *L);

/* the values of the replies, serialized, to compare the three ways */
typedef struct { char *p; size_t n, cap; } out;

static void put(out *o, const void *p, size_t n)
{
    if (o->n + n > o->cap) {
        o->cap = (o->n + n) * 2 + 64;
        o->p = realloc(o->p, o->cap);
        if (!o->p) abort();
    }
    memcpy(o->p + o->n, p, n);
    o->n += n;
}

static int visit(void *ud, const mw_resp_item *it)
{
    out *o = ud;
    unsigned char t = (unsigned char)it->type;
    put(o, &t, 1);
    put(o, &it->n, sizeof it->n);
    if (it->d == it->d) put(o, &it->d, sizeof it->d);
    else put(o, "nan", 3);
    switch (it->type) {
    case MW_RESP_SIMPLE: case MW_RESP_ERROR: case MW_RESP_BULK: case MW_RESP_BIGNUM:
    case MW_RESP_BLOBERR: case MW_RESP_VERBATIM:
        put(o, &it->len, sizeof it->len);
        put(o, it->p, it->len);
        break;
    default:
        break;
    }
    if (it->type == MW_RESP_VERBATIM) put(o, it->fmt, 3);
    return 0;
}

static uint64_t rng;
static size_t next_piece(void)
{
    rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
    uint64_t r = rng >> 33;
    return (r & 3) == 0 ? (size_t)(r >> 2) % 4096 + 1 : (size_t)(r >> 2) % 17 + 1;
}

/* Parses data fed `piece` bytes at a time (0: PRNG sizes, SIZE_MAX: whole); appends the
 * values to o, then the outcome ("E:" message or "P" partial). Returns replies parsed. */
static int parse(const uint8_t *data, size_t size, size_t piece, size_t max_bulk, int depth, out *o)
{
    mw_resp r;
    mw_resp_init(&r, max_bulk, depth);
    size_t head = 0, avail = 0;
    int replies = 0;
    for (;;) {
        const char *err = NULL;
        /* fed in pieces: the bytes seen so far in a block of their own size (moved each
         * time, as a connection's buffer may be), so that a read past them is ASan's */
        const char *win = (const char *)data + head;
        char *copy = NULL;
        if (piece != SIZE_MAX && avail - head <= 4096) {
            copy = malloc(avail - head ? avail - head : 1);
            if (!copy) abort();
            memcpy(copy, win, avail - head);
            win = copy;
        }
        int64_t k = mw_resp_scan(&r, win, avail - head, &err);
        if (k > 0) {
            size_t w = mw_resp_walk(win, (size_t)k, visit, o);
            free(copy);
            copy = NULL;
            if (w != (size_t)k) abort();                 /* walker and scanner disagree */
            head += (size_t)k;
            replies++;
            continue;
        }
        free(copy);
        if (k < 0) {
            put(o, "E:", 2);
            put(o, err, strlen(err));
            return replies;
        }
        if (avail == size) {
            put(o, "P", 1);
            return replies;
        }
        size_t step = piece == SIZE_MAX ? size : piece ? piece : next_piece();
        avail = size - avail < step ? size : avail + step;
    }
}

static lua_State *L;
static int fn_ref;

static const char harness[] =
    "local core = ...\n"
    "return function(data, bulk, depth)\n"
    "  local opts = { max_bulk = bulk, max_depth = depth }\n"
    "  local d, n1 = core.resp_decoder(opts), 0\n"
    "  d:feed(data)\n"
    "  while true do\n"
    "    local v, t = d:next()\n"
    "    if v == nil then break end\n"
    "    assert(type(t) == 'string' and #t == 1)\n"
    "    n1 = n1 + 1\n"
    "  end\n"
    "  local d2, n2, failed = core.resp_decoder(opts), 0, false\n"
    "  for i = 1, math.min(#data, 512) do\n"
    "    d2:feed(data:sub(i, i))\n"
    "    while true do\n"
    "      local v, t = d2:next()\n"
    "      if v == nil then failed = t ~= nil break end\n"
    "      n2 = n2 + 1\n"
    "    end\n"
    "    if failed then break end\n"
    "  end\n"
    "  if #data <= 512 then assert(n1 == n2, 'decoder: whole and byte by byte differ') end\n"
    "  return n1\n"
    "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    int depth = (data[0] & 15) + 1;
    size_t max_bulk = (size_t)1 << ((data[0] >> 4) + 2);
    data++;
    size--;
    out a = { 0 }, b = { 0 }, c = { 0 };
    rng = size;
    for (size_t i = 0; i < size && i < 16; i++) rng = rng * 31 + data[i];
    int na = parse(data, size, SIZE_MAX, max_bulk, depth, &a);
    int nb = parse(data, size, 0, max_bulk, depth, &b);
    int nc = parse(data, size, 1, max_bulk, depth, &c);
    if (na != nb || na != nc || a.n != b.n || a.n != c.n || memcmp(a.p, b.p, a.n) || memcmp(a.p, c.p, a.n)) {
        fprintf(stderr, "resp: whole / pieces / byte by byte disagree (%d %d %d replies)\n", na, nb, nc);
        abort();
    }
    free(a.p);
    free(b.p);
    free(c.p);

    if (!L) {
        L = luaL_newstate();
        luaL_openlibs(L);
        luaL_requiref(L, "moonwire.core", luaopen_moonwire_core, 0);
        if (luaL_loadstring(L, harness) != LUA_OK) abort();
        lua_insert(L, -2);
        lua_call(L, 1, 1);
        fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, fn_ref);
    lua_pushlstring(L, (const char *)data, size);
    lua_pushinteger(L, (lua_Integer)max_bulk);
    lua_pushinteger(L, depth);
    if (lua_pcall(L, 3, 1, 0) != LUA_OK) {
        fprintf(stderr, "resp harness: %s\n", lua_tostring(L, -1));
        abort();
    }
    if (lua_tointeger(L, -1) != na) {
        fprintf(stderr, "resp: the Lua decoder gave %d replies, the scanner %d\n", (int)lua_tointeger(L, -1), na);
        abort();
    }
    lua_settop(L, 0);
    return 0;
}
