/* hdr: HDR-style latency histograms (log-linear buckets, 3 significant digits, values in
 * microseconds up to 2^40), mergeable exactly across threads; with wrk2's correction for
 * coordinated omission. Lua-free core plus a small binding (moonwire.Histogram). */
#include "hdr.h"
#include "sched.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define HDR_MT "moonwire.Histogram"
#define SUB_BITS 11
#define SUB_COUNT (1 << SUB_BITS)          /* 2048 */
#define SUB_HALF (SUB_COUNT / 2)           /* 1024 */
#define MAX_SHIFT 30
#define NBUCKETS (MAX_SHIFT * SUB_HALF + SUB_COUNT)
#define MAX_VALUE (((uint64_t)SUB_COUNT << MAX_SHIFT) - 1)

typedef struct {
    uint64_t total, min, max;
    uint64_t sum_lo, sum_hi;               /* the sum, a 128-bit integer: exact in any order */
    uint64_t clamped;                      /* samples above MAX_VALUE, kept in the top bucket */
    uint64_t counts[NBUCKETS];
} hdr_t;

static int index_of(uint64_t v)
{
    if (v > MAX_VALUE) v = MAX_VALUE;
    if (v < SUB_COUNT) return (int)v;
    int b = (63 - __builtin_clzll(v)) - (SUB_BITS - 1);
    return b * SUB_HALF + (int)(v >> b);
}

static uint64_t lowest_of(int i)
{
    if (i < SUB_COUNT) return (uint64_t)i;
    int b = i / SUB_HALF - 1;
    uint64_t sub = (uint64_t)(i - b * SUB_HALF);
    return sub << b;
}

static uint64_t highest_of(int i)
{
    if (i < SUB_COUNT) return (uint64_t)i;
    int b = i / SUB_HALF - 1;
    uint64_t sub = (uint64_t)(i - b * SUB_HALF);
    return ((sub + 1) << b) - 1;
}

typedef unsigned __int128 u128;

static u128 sum_of(const hdr_t *h) { return (u128)h->sum_hi << 64 | h->sum_lo; }

static void sum_add(hdr_t *h, u128 x)
{
    u128 s = sum_of(h) + x;
    h->sum_lo = (uint64_t)s;
    h->sum_hi = (uint64_t)(s >> 64);
}

static void record(hdr_t *h, uint64_t v, uint64_t n)
{
    if (n == 0) return;
    if (v > MAX_VALUE) h->clamped += n;
    h->counts[index_of(v)] += n;
    if (h->total == 0 || v < h->min) h->min = v;
    if (v > h->max) h->max = v;
    h->total += n;
    sum_add(h, (u128)v * n);
}

static uint64_t percentile(const hdr_t *h, double p)
{
    if (h->total == 0) return 0;
    if (p > 100) p = 100;
    uint64_t want = (uint64_t)ceil((double)h->total * p / 100.0);
    if (want == 0) want = 1;
    uint64_t seen = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= want) {
            uint64_t v = highest_of(i);
            return v > h->max ? h->max : v;
        }
    }
    return h->max;
}

static hdr_t *checkh(lua_State *L, int idx) { return luaL_checkudata(L, idx, HDR_MT); }

mw_hdr *mw_hdr_check(lua_State *L, int idx) { return (mw_hdr *)checkh(L, idx); }
void mw_hdr_record(mw_hdr *h, uint64_t v) { record((hdr_t *)h, v, 1); }

static int l_new(lua_State *L)
{
    hdr_t *h = lua_newuserdatauv(L, sizeof *h, 0);
    memset(h, 0, sizeof *h);
    luaL_setmetatable(L, HDR_MT);
    return 1;
}

/* h:record(value_us [, count]) */
static int h_record(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    lua_Integer v = luaL_checkinteger(L, 2);
    lua_Integer n = luaL_optinteger(L, 3, 1);
    record(h, v < 0 ? 0 : (uint64_t)v, n < 0 ? 0 : (uint64_t)n);
    return 0;
}

/* h:record_corrected(value_us, expected_interval_us): as wrk2 does, a stall also fills in
 * the samples the requests queued behind it would have reported */
static int h_record_corrected(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    lua_Integer v = luaL_checkinteger(L, 2);
    lua_Integer interval = luaL_checkinteger(L, 3);
    if (v < 0) v = 0;
    record(h, (uint64_t)v, 1);
    if (interval <= 0) return 0;
    for (lua_Integer missing = v - interval; missing >= interval; missing -= interval)
        record(h, (uint64_t)missing, 1);
    return 0;
}

static int h_merge(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    hdr_t *o = checkh(L, 2);
    for (int i = 0; i < NBUCKETS; i++) h->counts[i] += o->counts[i];
    if (o->total) {
        if (h->total == 0 || o->min < h->min) h->min = o->min;
        if (o->max > h->max) h->max = o->max;
    }
    h->total += o->total;
    sum_add(h, sum_of(o));
    h->clamped += o->clamped;
    return 0;
}

/* h:encode() -> string (non-empty buckets only, native byte order: total, min, max, clamped,
 * sum as a 128-bit integer, then index/count pairs); histogram_decode(s) -> h */
static int h_encode(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    uint64_t hdr[4] = { h->total, h->min, h->max, h->clamped };
    luaL_addlstring(&b, (const char *)hdr, sizeof hdr);
    uint64_t sum[2] = { h->sum_lo, h->sum_hi };
    luaL_addlstring(&b, (const char *)sum, sizeof sum);
    for (int i = 0; i < NBUCKETS; i++) {
        if (!h->counts[i]) continue;
        uint32_t idx = (uint32_t)i;
        luaL_addlstring(&b, (const char *)&idx, sizeof idx);
        luaL_addlstring(&b, (const char *)&h->counts[i], sizeof h->counts[i]);
    }
    luaL_pushresult(&b);
    return 1;
}

static int l_decode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    size_t head = 6 * sizeof(uint64_t), rec = sizeof(uint32_t) + sizeof(uint64_t);
    if (n < head || (n - head) % rec) return luaL_argerror(L, 1, "not an encoded histogram");
    l_new(L);
    hdr_t *h = lua_touserdata(L, -1);
    uint64_t hdr[4];
    memcpy(hdr, s, sizeof hdr);
    h->total = hdr[0];
    h->min = hdr[1];
    h->max = hdr[2];
    h->clamped = hdr[3];
    uint64_t sum[2];
    memcpy(sum, s + sizeof hdr, sizeof sum);
    h->sum_lo = sum[0];
    h->sum_hi = sum[1];
    for (size_t off = head; off < n; off += rec) {
        uint32_t idx;
        uint64_t c;
        memcpy(&idx, s + off, sizeof idx);
        memcpy(&c, s + off + sizeof idx, sizeof c);
        if (idx >= NBUCKETS) return luaL_argerror(L, 1, "not an encoded histogram");
        h->counts[idx] = c;
    }
    return 1;
}

static int h_percentile(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    lua_pushinteger(L, (lua_Integer)percentile(h, luaL_checknumber(L, 2)));
    return 1;
}

/* h:stats() -> count, min, max, mean, stdev */
static int h_stats(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    double mean = h->total ? (double)sum_of(h) / (double)h->total : 0, var = 0;
    if (h->total > 1) {
        for (int i = 0; i < NBUCKETS; i++) {
            if (!h->counts[i]) continue;
            double mid = ((double)lowest_of(i) + (double)highest_of(i)) / 2, d = mid - mean;
            var += d * d * (double)h->counts[i];
        }
        var /= (double)(h->total - 1);
    }
    lua_pushinteger(L, (lua_Integer)h->total);
    lua_pushinteger(L, (lua_Integer)h->min);
    lua_pushinteger(L, (lua_Integer)h->max);
    lua_pushnumber(L, mean);
    lua_pushnumber(L, sqrt(var));
    return 5;
}

/* h:within(lo, hi) -> share (0..100) of samples in [lo, hi] (wrk's "+/- Stdev") */
static int h_within(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    double lo = luaL_checknumber(L, 2), hi = luaL_checknumber(L, 3);
    uint64_t in = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        if (!h->counts[i]) continue;
        double v = (double)lowest_of(i);
        if (v >= lo && v <= hi) in += h->counts[i];
    }
    lua_pushnumber(L, h->total ? 100.0 * (double)in / (double)h->total : 0);
    return 1;
}

/* h:buckets() -> { {value, count}, ... } for the non-empty buckets, in order */
static int h_buckets(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    lua_newtable(L);
    int k = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        if (!h->counts[i]) continue;
        lua_createtable(L, 2, 0);
        uint64_t v = highest_of(i);
        lua_pushinteger(L, (lua_Integer)(v > h->max ? h->max : v));
        lua_rawseti(L, -2, 1);
        lua_pushinteger(L, (lua_Integer)h->counts[i]);
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, ++k);
    }
    return 1;
}

/* h:clamped() -> how many samples were above the largest value kept (2^41 - 1): they count
 * in the top bucket, so percentiles there are capped; max keeps the true value */
static int h_clamped(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)checkh(L, 1)->clamped);
    return 1;
}

static int h_reset(lua_State *L)
{
    hdr_t *h = checkh(L, 1);
    memset(h, 0, sizeof *h);
    return 0;
}

void mw_hdr_open(lua_State *L)
{
    static const luaL_Reg m[] = {
        { "record", h_record }, { "record_corrected", h_record_corrected }, { "merge", h_merge },
        { "encode", h_encode }, { "percentile", h_percentile }, { "stats", h_stats },
        { "within", h_within }, { "buckets", h_buckets }, { "reset", h_reset },
        { "clamped", h_clamped }, { NULL, NULL }
    };
    if (luaL_newmetatable(L, HDR_MT)) {
        luaL_newlib(L, m);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, l_new);
    lua_setfield(L, -2, "histogram");
    lua_pushcfunction(L, l_decode);
    lua_setfield(L, -2, "histogram_decode");
}
