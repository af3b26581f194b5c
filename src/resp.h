/* resp: the Redis wire format, RESP2 and RESP3, Lua-free. A reply is parsed in two passes:
 * mw_resp_scan checks the bytes as they arrive, resuming where it stopped (so a 100 MB bulk
 * that arrives in 16 KiB pieces costs one look per piece, not a rescan), and says when a
 * whole reply is in the buffer; mw_resp_walk then visits that reply's values in order, as
 * spans into the buffer. The encoder side (commands as arrays of bulk strings) is in resp.c
 * with the Lua binding; the connection that pipelines commands too. */
#ifndef MW_RESP_H
#define MW_RESP_H

#include <stddef.h>
#include <stdint.h>

#define MW_RESP_DEPTH_MAX 128           /* the most a parser may be configured for */
#define MW_RESP_COUNT_MAX 0x7fffffff    /* elements of one aggregate (a Lua table's int size) */

/* Values mw_resp_walk reports (the type byte of each, except END and the nulls). */
enum {
    MW_RESP_SIMPLE = '+', MW_RESP_ERROR = '-', MW_RESP_INTEGER = ':', MW_RESP_BULK = '$',
    MW_RESP_ARRAY = '*', MW_RESP_NULL = '_', MW_RESP_BOOL = '#', MW_RESP_DOUBLE = ',',
    MW_RESP_BIGNUM = '(', MW_RESP_BLOBERR = '!', MW_RESP_VERBATIM = '=', MW_RESP_MAP = '%',
    MW_RESP_SET = '~', MW_RESP_PUSH = '>', MW_RESP_ATTR = '|',
    MW_RESP_END = 0                     /* after the elements of an aggregate */
};

typedef struct mw_resp {
    size_t max_bulk;       /* longest bulk string or line, bytes */
    int max_depth;         /* deepest nesting of aggregates (<= MW_RESP_DEPTH_MAX) */
    /* the reply being scanned; offsets count from its first byte */
    size_t pos;            /* where the next element starts or (in_bulk) where a bulk ends */
    size_t scan;           /* a line being waited for: bytes after pos known to hold no '\n' */
    int in_bulk;           /* the type byte of the bulk being waited for ('$', '=', '!'), or 0 */
    size_t bulk_start;     /* where its payload starts */
    int depth;             /* aggregates open */
    struct { int64_t left; int attr; } open[MW_RESP_DEPTH_MAX];
} mw_resp;

typedef struct mw_resp_item {
    int type;              /* MW_RESP_*; a null bulk or array ($-1, *-1) is MW_RESP_NULL */
    const char *p;         /* strings: the bytes (verbatim: without the "txt:" prefix) */
    size_t len;
    int64_t n;             /* integer; boolean (0/1); aggregates: element count (map: pairs) */
    double d;              /* double */
    const char *fmt;       /* verbatim: its three-byte format ("txt", "mkd") */
} mw_resp_item;

/* Returns 0 to go on, anything else to stop the walk (mw_resp_walk then returns 0). */
typedef int (*mw_resp_visit)(void *ud, const mw_resp_item *it);

/* Sets the limits and clears the state. */
void mw_resp_init(mw_resp *r, size_t max_bulk, int max_depth);
/* Scans buf[0, len), which starts at the reply being parsed and holds every byte given to
 * the previous calls for it (the caller may move the buffer, not drop its head). Returns
 * the length of the whole reply at the head of buf (the state is reset for the next one),
 * 0 when more bytes are needed (the state keeps what was seen), or -1 on a protocol error
 * (*err says which; the state is reset, the stream is unusable). */
int64_t mw_resp_scan(mw_resp *r, const char *buf, size_t len, const char **err);
/* When the reply in progress needs a known number of bytes (a bulk): that total, else 0. */
size_t mw_resp_need(const mw_resp *r);
/* Visits the values of the reply at buf (len: the length mw_resp_scan returned for it): each scalar,
 * each aggregate before its elements, MW_RESP_END after them. Attributes (|) are skipped.
 * Returns the reply's length, or 0 when visit stopped the walk. */
size_t mw_resp_walk(const char *buf, size_t len, mw_resp_visit visit, void *ud);

#endif
