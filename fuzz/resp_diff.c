/* Differential test of the RESP parser (src/resp.c) against hiredis 0.14's reader, on RESP2.
 * The same bytes go to both: hiredis whole (redisReaderFeed once), ours byte by byte (the
 * scanner resuming after each byte). Each reply both accept must be the same tree. Where
 * hiredis rejects the input, ours must not accept that reply (ours may reject earlier: it
 * is stricter, e.g. a bulk not followed by CRLF, a bare LF in a line). Replies with RESP3
 * types end the comparison (hiredis 0.14 knows none of them). max_depth is 8, hiredis's.
 *
 * Two builds: a libFuzzer target (`make fuzz`, FUZZ_TARGETS), and with -DRESP_DIFF_MAIN a
 * program (spec/resp_spec.lua compiles it) that checks generated valid RESP2 streams and
 * mutations of them: `resp_diff [count] [seed]` prints "compared N replies ..." and exits
 * non-zero on a disagreement. Links src/resp.c and -lhiredis only. */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <hiredis/hiredis.h>

#include "../src/resp.h"

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

static void put_item(out *o, char t, long long n, const char *p, size_t len)
{
    put(o, &t, 1);
    put(o, &n, sizeof n);
    put(o, &len, sizeof len);
    if (len) put(o, p, len);
}

static int resp3;   /* the reply being serialized had a RESP3 type */

static int visit(void *ud, const mw_resp_item *it)
{
    out *o = ud;
    switch (it->type) {
    case MW_RESP_SIMPLE: case MW_RESP_ERROR: case MW_RESP_BULK:
        put_item(o, (char)it->type, 0, it->p, it->len);
        break;
    case MW_RESP_INTEGER:
        put_item(o, ':', (long long)it->n, NULL, 0);
        break;
    case MW_RESP_NULL:
        if (it->p[-1] != '$' && it->p[-1] != '*') resp3 = 1;   /* "_": RESP3 */
        put_item(o, '_', 0, NULL, 0);
        break;
    case MW_RESP_ARRAY:
        put_item(o, '*', (long long)it->n, NULL, 0);
        break;
    case MW_RESP_END:
        put_item(o, 'E', 0, NULL, 0);
        break;
    default:
        resp3 = 1;
        break;
    }
    return 0;
}

static void put_hiredis(out *o, const redisReply *r)
{
    switch (r->type) {
    case REDIS_REPLY_STRING: put_item(o, '$', 0, r->str, r->len); break;
    case REDIS_REPLY_STATUS: put_item(o, '+', 0, r->str, r->len); break;
    case REDIS_REPLY_ERROR: put_item(o, '-', 0, r->str, r->len); break;
    case REDIS_REPLY_INTEGER: put_item(o, ':', r->integer, NULL, 0); break;
    case REDIS_REPLY_NIL: put_item(o, '_', 0, NULL, 0); break;
    case REDIS_REPLY_ARRAY:
        put_item(o, '*', (long long)r->elements, NULL, 0);
        for (size_t i = 0; i < r->elements; i++) put_hiredis(o, r->element[i]);
        put_item(o, 'E', 0, NULL, 0);
        break;
    default: abort();
    }
}

static unsigned long compared, stricter, stopped_resp3;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* hiredis allocates an array's element pointers when it reads the count: skip inputs
     * that would have it ask for gigabytes */
    for (size_t i = 0; i < size; i++) {
        if (data[i] != '*') continue;
        unsigned long long v = 0;
        for (size_t j = i + 1; j < size && data[j] >= '0' && data[j] <= '9' && v < 1000000; j++)
            v = v * 10 + (data[j] - '0');
        if (v >= 1000000) return 0;
    }
    redisReader *hr = redisReaderCreate();
    if (!hr) abort();
    redisReaderFeed(hr, (const char *)data, size);
    mw_resp r;
    mw_resp_init(&r, 512u * 1024 * 1024, 8);
    size_t head = 0, avail = 0;
    for (;;) {
        /* ours: the next reply, byte by byte */
        const char *err = NULL;
        int64_t k;
        for (;;) {
            k = mw_resp_scan(&r, (const char *)data + head, avail - head, &err);
            if (k != 0 || avail == size) break;
            avail++;
        }
        /* hiredis: the next reply from what it was given whole */
        void *rep = NULL;
        int hrc = redisReaderGetReply(hr, &rep);
        if (k > 0) {
            out a = { 0 }, b = { 0 };
            resp3 = 0;
            mw_resp_walk((const char *)data + head, (size_t)k, visit, &a);
            /* an attribute is skipped by the walk: hiredis names its type byte */
            if (hrc != REDIS_OK && strncmp(hr->errstr, "Protocol error, got \"", 21) == 0 &&
                hr->errstr[21] && strchr("_#,(!=%~>|", hr->errstr[21]))
                resp3 = 1;
            /* hiredis 0.14 reads at most 7 levels of nesting (ours: the configured limit): a
             * deeper reply is beyond what it can compare, as RESP3 is */
            if (hrc != REDIS_OK && strstr(hr->errstr, "nested multi bulk replies with depth"))
                resp3 = 1;
            if (resp3) {                               /* beyond what hiredis reads: stop comparing */
                stopped_resp3++;
                free(a.p);
                if (rep) freeReplyObject(rep);
                break;
            }
            if (hrc != REDIS_OK || !rep) {
                fprintf(stderr, "resp_diff: ours accepted a reply at offset %zu that hiredis %s\n",
                        head, hrc != REDIS_OK ? hr->errstr : "still waits for");
                abort();
            }
            put_hiredis(&b, rep);
            freeReplyObject(rep);
            if (a.n != b.n || memcmp(a.p, b.p, a.n) != 0) {
                fprintf(stderr, "resp_diff: the reply at offset %zu differs\n", head);
                abort();
            }
            free(a.p);
            free(b.p);
            compared++;
            head += (size_t)k;
            continue;
        }
        if (k < 0) {                                   /* ours rejects: hiredis may be laxer */
            if (hrc == REDIS_OK && rep) stricter++;
        } else if (hrc == REDIS_OK && rep) {           /* ours waits: so must hiredis */
            fprintf(stderr, "resp_diff: hiredis parsed a reply at offset %zu where ours waits for more\n", head);
            abort();
        }
        if (rep) freeReplyObject(rep);
        break;
    }
    redisReaderFree(hr);
    return 0;
}

#ifdef RESP_DIFF_MAIN
/* ---- generated RESP2: valid streams and mutations of them ---------------------------- */

static uint64_t rng;
static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void gen_bytes(out *o, size_t n, int line)
{
    static const char alpha[] = "abcXYZ019 \r\n\t\x01\xff$*:+-";
    for (size_t i = 0; i < n; i++) {
        char c = alpha[rnd() % (sizeof alpha - 1)];
        if (line && (c == '\r' || c == '\n')) c = '_';
        put(o, &c, 1);
    }
}

static void gen(out *o, int depth)
{
    char tmp[64];
    int k = (int)(rnd() % (depth < 8 ? 7 : 5));
    switch (k) {
    case 0: put(o, "+", 1); gen_bytes(o, rnd() % 20, 1); put(o, "\r\n", 2); break;
    case 1: put(o, "-", 1); gen_bytes(o, rnd() % 20, 1); put(o, "\r\n", 2); break;
    case 2: {
        long long v = (long long)rnd();
        if (rnd() % 2) v %= 1000;
        put(o, tmp, (size_t)snprintf(tmp, sizeof tmp, ":%lld\r\n", v));
        break;
    }
    case 3: {
        size_t n = rnd() % 4 == 0 ? rnd() % 3000 : rnd() % 12;
        put(o, tmp, (size_t)snprintf(tmp, sizeof tmp, "$%zu\r\n", n));
        gen_bytes(o, n, 0);
        put(o, "\r\n", 2);
        break;
    }
    case 4: put(o, rnd() % 2 ? "$-1\r\n" : "*-1\r\n", 5); break;
    default: {
        int n = (int)(rnd() % 5);
        put(o, tmp, (size_t)snprintf(tmp, sizeof tmp, "*%d\r\n", n));
        for (int i = 0; i < n; i++) gen(o, depth + 1);
    }
    }
}

int main(int argc, char **argv)
{
    long count = argc > 1 ? atol(argv[1]) : 20000;
    rng = argc > 2 ? strtoull(argv[2], NULL, 10) : 88172645463325252ULL;
    if (!rng) rng = 1;
    unsigned long mutated = 0;
    for (long i = 0; i < count; i++) {
        out o = { 0 };
        int replies = 1 + (int)(rnd() % 4);
        for (int j = 0; j < replies; j++) gen(&o, 1);
        LLVMFuzzerTestOneInput((const uint8_t *)o.p, o.n);
        /* a mutation: a changed, dropped or inserted byte */
        if (o.n > 0) {
            size_t at = rnd() % o.n;
            int how = (int)(rnd() % 3);
            if (how == 0) o.p[at] = (char)rnd();
            else if (how == 1) { memmove(o.p + at, o.p + at + 1, o.n - at - 1); o.n--; }
            else { put(&o, "", 1); memmove(o.p + at + 1, o.p + at, o.n - at - 1); o.p[at] = "\r\n$*:-+0"[rnd() % 8]; }
            LLVMFuzzerTestOneInput((const uint8_t *)o.p, o.n);
            mutated++;
        }
        free(o.p);
    }
    printf("compared %lu replies (%ld generated streams, %lu mutations): all identical; "
           "ours stricter on %lu, RESP3 stops %lu\n", compared, count, mutated, stricter, stopped_resp3);
    return 0;
}
#endif
