/* resp: the RESP2/RESP3 reply parser (see resp.h). Lua-free: the binding and the
 * connection are in redis.c. The scanner is resumable (its state is a position, the bytes
 * of a line already searched, and the elements each open aggregate still expects), so
 * feeding a reply in any split costs the same as feeding it whole; the walker trusts what
 * the scanner accepted and only decodes. */
#include "resp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void mw_resp_init(mw_resp *r, size_t max_bulk, int max_depth)
{
    r->max_bulk = max_bulk;
    r->max_depth = max_depth < 1 ? 1 : max_depth > MW_RESP_DEPTH_MAX ? MW_RESP_DEPTH_MAX : max_depth;
    r->pos = r->scan = 0;
    r->in_bulk = 0;
    r->depth = 0;
}

/* A decimal int64 as Redis writes one: "0", or an optional '-' and 1 to 19 digits without
 * a leading zero; nothing else (as hiredis's string2ll). */
static int parse_int(const char *p, size_t n, int64_t *out)
{
    size_t i = 0;
    int neg = 0;
    if (n == 1 && p[0] == '0') { *out = 0; return 0; }
    if (n > 0 && p[0] == '-') { neg = 1; i = 1; }
    if (i == n || n - i > 19 || p[i] == '0') return -1;
    uint64_t v = 0;
    for (; i < n; i++) {
        unsigned d = (unsigned char)p[i] - '0';
        if (d > 9) return -1;
        v = v * 10 + d;
    }
    if (v > (uint64_t)INT64_MAX + neg) return -1;
    *out = neg ? (v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v) : (int64_t)v;
    return 0;
}

/* A RESP3 double: inf, -inf, nan (also +inf, -nan) or [+-]digits[.digits][e[+-]digits]. */
static int parse_double(const char *p, size_t n, double *out)
{
    const char *q = p;
    size_t m = n;
    int neg = 0;
    if (m > 0 && (*q == '-' || *q == '+')) { neg = *q == '-'; q++; m--; }
    if (m == 3 && memcmp(q, "inf", 3) == 0) { *out = neg ? -HUGE_VAL : HUGE_VAL; return 0; }
    if (m == 3 && memcmp(q, "nan", 3) == 0) { *out = NAN; return 0; }
    size_t i = 0, digits = 0;
    while (i < m && q[i] >= '0' && q[i] <= '9') { i++; digits++; }
    if (i < m && q[i] == '.') {
        i++;
        while (i < m && q[i] >= '0' && q[i] <= '9') { i++; digits++; }
    }
    if (digits == 0) return -1;
    if (i < m && (q[i] == 'e' || q[i] == 'E')) {
        i++;
        if (i < m && (q[i] == '-' || q[i] == '+')) i++;
        size_t e = i;
        while (i < m && q[i] >= '0' && q[i] <= '9') i++;
        if (i == e) return -1;
    }
    if (i != m || n > 400) return -1;
    char tmp[401];
    memcpy(tmp, p, n);
    tmp[n] = '\0';
    *out = strtod(tmp, NULL);
    return 0;
}

/* A big number: an optional sign, then at least one digit. */
static int valid_bignum(const char *p, size_t n)
{
    size_t i = (n > 0 && (p[0] == '-' || p[0] == '+')) ? 1 : 0;
    if (i == n) return 0;
    for (; i < n; i++)
        if (p[i] < '0' || p[i] > '9') return 0;
    return 1;
}

size_t mw_resp_need(const mw_resp *r)
{
    return r->in_bulk ? r->pos : 0;
}

static int64_t fail(mw_resp *r, const char **err, const char *msg)
{
    *err = msg;
    mw_resp_init(r, r->max_bulk, r->max_depth);
    return -1;
}

int64_t mw_resp_scan(mw_resp *r, const char *b, size_t n, const char **err)
{
    for (;;) {
        if (r->in_bulk) {
            if (r->pos > n) return 0;
            if (b[r->pos - 2] != '\r' || b[r->pos - 1] != '\n')
                return fail(r, err, "bulk string not followed by CRLF");
            if (r->in_bulk == '=' && b[r->bulk_start + 3] != ':') return fail(r, err, "bad verbatim string");
            r->in_bulk = 0;
        } else {
            size_t pos = r->pos;
            if (pos >= n) return 0;
            if (!strchr("+-:_#,($=!*%~>|", b[pos]) || b[pos] == '\0') return fail(r, err, "unknown reply type");
            if (pos + 1 + r->scan >= n) return 0;
            const char *nl = memchr(b + pos + 1 + r->scan, '\n', n - pos - 1 - r->scan);
            if (!nl) {
                r->scan = n - pos - 1;
                if (r->scan > r->max_bulk + 32) return fail(r, err, "line too long");
                return 0;
            }
            r->scan = 0;
            size_t end = (size_t)(nl - b);              /* the '\n' */
            /* the same verdict as the partial case above, whatever the split */
            if (end - pos - 1 > r->max_bulk + 32) return fail(r, err, "line too long");
            if (b[end - 1] != '\r' || end - 1 < pos + 1) return fail(r, err, "line not ended by CRLF");
            int type = (unsigned char)b[pos];
            const char *line = b + pos + 1;
            size_t ll = end - 1 - (pos + 1);
            int64_t v;
            double d;
            r->pos = end + 1;
            switch (type) {
            case '+': case '-':
                if (ll > r->max_bulk) return fail(r, err, "line too long");
                break;
            case ':':
                if (parse_int(line, ll, &v) < 0) return fail(r, err, "bad integer");
                break;
            case '_':
                if (ll != 0) return fail(r, err, "bad null");
                break;
            case '#':
                if (ll != 1 || (line[0] != 't' && line[0] != 'f')) return fail(r, err, "bad boolean");
                break;
            case ',':
                if (parse_double(line, ll, &d) < 0) return fail(r, err, "bad double");
                break;
            case '(':
                if (!valid_bignum(line, ll)) return fail(r, err, "bad big number");
                break;
            case '$': case '=': case '!':
                if (parse_int(line, ll, &v) < 0 || v < (type == '$' ? -1 : 0))
                    return fail(r, err, "bad bulk length");
                if (v == -1) break;                     /* null bulk */
                if ((uint64_t)v > r->max_bulk) return fail(r, err, "bulk string too long");
                if (type == '=' && v < 4) return fail(r, err, "bad verbatim string");
                r->bulk_start = r->pos;
                r->pos += (size_t)v + 2;
                r->in_bulk = type;
                if (r->pos > n) return 0;
                continue;                               /* checks the CRLF at the top */
            case '*': case '%': case '~': case '>': case '|':
                if (parse_int(line, ll, &v) < 0 || v < (type == '*' ? -1 : 0) || v > MW_RESP_COUNT_MAX)
                    return fail(r, err, "bad aggregate length");
                if (v == 0 && type == '|') continue;    /* an empty attribute: no element */
                if (v <= 0) break;                      /* empty, or a null array */
                if (r->depth >= r->max_depth) return fail(r, err, "nesting too deep");
                r->open[r->depth].left = (type == '%' || type == '|') ? 2 * v : v;
                r->open[r->depth].attr = type == '|';
                r->depth++;
                continue;
            default:
                return fail(r, err, "unknown reply type");
            }
        }
        /* an element is complete: close the aggregates it completes */
        for (;;) {
            if (r->depth == 0) {
                size_t total = r->pos;
                mw_resp_init(r, r->max_bulk, r->max_depth);
                return (int64_t)total;
            }
            if (--r->open[r->depth - 1].left > 0) break;
            r->depth--;
            if (r->open[r->depth].attr) break;          /* an attribute is no element: its value follows */
        }
    }
}

/* ---- the walk over a whole reply ------------------------------------------------------ */

/* Visits the element at pos (visit NULL: skips it); returns the position after it, or 0
 * when the visitor stopped. */
static size_t walk(const char *b, size_t n, size_t pos, mw_resp_visit visit, void *ud)
{
    for (;;) {
        const char *nl = memchr(b + pos + 1, '\n', n - pos - 1);   /* the scan found it */
        size_t end = (size_t)(nl - b);
        const char *line = b + pos + 1;
        size_t ll = end - 1 - (pos + 1);
        size_t next = end + 1;
        mw_resp_item it;
        it.type = (unsigned char)b[pos];
        it.p = line;
        it.len = ll;
        it.n = 0;
        it.d = 0;
        it.fmt = NULL;
        switch (it.type) {
        case '+': case '-': case '(':
            break;
        case ':':
            parse_int(line, ll, &it.n);
            break;
        case '_':
            break;
        case '#':
            it.n = line[0] == 't';
            break;
        case ',':
            parse_double(line, ll, &it.d);
            break;
        case '$': case '=': case '!': {
            int64_t v;
            parse_int(line, ll, &v);
            if (v < 0) { it.type = MW_RESP_NULL; break; }
            it.p = b + next;
            it.len = (size_t)v;
            next += (size_t)v + 2;
            if (it.type == '=') { it.fmt = it.p; it.p += 4; it.len -= 4; }
            break;
        }
        default: {  /* aggregates */
            int64_t v;
            parse_int(line, ll, &v);
            if (it.type == '|') {              /* skip the attribute, then the value it annotates */
                for (int64_t i = 0; i < 2 * v; i++) next = walk(b, n, next, NULL, ud);
                pos = next;
                continue;
            }
            if (v < 0) { it.type = MW_RESP_NULL; break; }
            it.n = v;
            if (visit && visit(ud, &it)) return 0;
            int64_t k = it.type == '%' ? 2 * v : v;
            for (int64_t i = 0; i < k; i++) {
                next = walk(b, n, next, visit, ud);
                if (!next) return 0;
            }
            it.type = MW_RESP_END;
            if (visit && visit(ud, &it)) return 0;
            return next;
        }
        }
        if (visit && visit(ud, &it)) return 0;
        return next;
    }
}

size_t mw_resp_walk(const char *buf, size_t len, mw_resp_visit visit, void *ud)
{
    return walk(buf, len, 0, visit, ud);
}
