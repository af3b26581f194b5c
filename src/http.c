/* http: HTTP/1.1 messages over a stream. llhttp (strict) parses request heads and bodies
 * straight from the socket's read buffer; callbacks only record spans and flags (never
 * call Lua); Lua values are built after llhttp_execute returns. The response side builds
 * the head bytes (status line, headers, cached Date) for one gathered write by the stream.
 * This file enforces the protocol rules of docs/http.md that llhttp does not. */
#define _GNU_SOURCE
#include "http.h"
#include "stream.h"
#include "tls.h"
#include "mwlua.h"

#include <ctype.h>
#include <pthread.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <llhttp.h>

#define HC_MT "moonwire.HttpConn"
/* a response to a pipelined request is gathered (see l_http_send) while the output buffer
 * stays within one standard block */
#define MW_GATHER_MAX MW_BUF_BLOCK

typedef struct { uint32_t noff, nlen, voff, vlen; } hspan;

typedef struct mw_http {
    llhttp_t p;
    uint64_t magic;            /* HC_MAGIC: see hc_of */
    mw_sock *s;                /* the socket (kept alive as user value 1) */
    /* limits */
    size_t max_line, max_head, max_headers;
    /* the message being parsed; spans are offsets from `base` (the head's first byte) */
    const char *base;
    size_t parsed;             /* bytes from the head start (or body start) fed to llhttp */
    uint32_t url_off, url_len;
    int url_open, field_open, value_open, value_done;
    hspan *hdrs;               /* responses (client side): every field's span */
    int nhdrs, caphdrs;
    hspan cur;                 /* requests: the field being parsed; each is checked once whole
                                * (check_field) and not kept: the head is found again from its
                                * bytes if the handler asks for headers (hc:headers_of) */
    int hosts, te, cl;         /* how many Host, Transfer-Encoding (responses too), Content-Length */
    int ferr_status;           /* requests: the first field's verdict (400, 501), for the end */
    const char *ferr_msg;      /* of the head, after the version's */
    int head_done, msg_done, upgrade;
    int err_status;            /* our verdict from a callback: 400, 413, 414, 431, 501, 505 */
    const char *err_msg;
    /* body */
    mw_buf body;
    uint64_t body_max, body_seen;
    int64_t deadline;          /* head or body deadline, ns */
    int64_t idle_deadline, head_timeout;
    int expect_continue;
    int skip_body;             /* client side: the request was HEAD, the response has no body */
    int discard;               /* body bytes are dropped, not collected (the load generator) */
    mw_buf trailers;           /* trailer fields after a chunked body: "name:value\n"... */
    int in_trailer_field;
    /* the trailer section's bytes, scanned with the head's line rules as llhttp consumes
     * them (scan_trailers): on_chunk_header pauses at the last chunk (tr_mark) so that feed
     * knows where the section starts */
    int tr_mark, tr_on;
    int tr_lf, tr_before, tr_last;  /* the last byte scanned was an LF; the byte before it; the last */
    uint32_t ext_len;          /* the chunk extension name or value being parsed, so far */
    uint32_t ext_total;        /* the extensions of the chunk being parsed, so far */
    uint64_t msg_bytes;        /* bytes of this message taken from the socket (head, body, framing) */
    int idle_wait;             /* parked in read_request with nothing of the next head yet */
    int blank_lines;           /* requests: empty lines skipped before this request line */
    int head_armed;            /* read_request: `deadline` runs (from the first byte of this
                                * request, a first empty line excepted: nothing re-arms it) */
    /* for res:send's C path (server side): the server's name and from which body size a
     * response may be compressed (read once from the server table), and what the request
     * being answered said (set with each request; responses are finished in order) */
    char server_name[64];
    int has_server_name;       /* 1 a name, 0 none, -1 too long for this path */
    double gzip_from;
    int req_keepalive, req_http10, req_head, req_connect;
    int closing;               /* the server is closing: responses say Connection: close, and
                                * read_request reads no further request */
    double idle_s, head_s;     /* read_request's timeouts when given none (the server's) */
} mw_http;

/* ---- llhttp callbacks: spans and verdicts only ------------------------------------- */

static mw_http *H(llhttp_t *p) { return (mw_http *)p; }

#define HC_MAGIC UINT64_C(0x6d77687474706363)   /* "mwhttpcc" */

/* The connection object at idx, told by its size and a magic number rather than by its
 * metatable (two API calls fewer on the request path), or NULL when idx holds something
 * else. */
static mw_http *hc_of(lua_State *L, int idx)
{
    return mw_udata_magic(L, idx, sizeof(mw_http), offsetof(mw_http, magic), HC_MAGIC);
}

/* Records our verdict (status 0: a client-side error with no status to answer). */
static int fail(llhttp_t *p, int status, const char *msg)
{
    H(p)->err_status = status ? status : -1;
    H(p)->err_msg = msg;
    return HPE_USER;
}

static int on_message_begin(llhttp_t *p)
{
    mw_http *h = H(p);
    h->url_off = h->url_len = 0;
    h->url_open = h->field_open = h->value_open = 0;
    h->nhdrs = 0;
    h->hosts = h->te = h->cl = h->ferr_status = 0;
    return 0;
}

/* Whether the connection may carry another message after this one: llhttp's answer, but an
 * HTTP/1.0 response with Transfer-Encoding has faulty framing, and the client closes the
 * connection after it (RFC 9112 §6.1; a request like it is refused, check_field). */
static int msg_keepalive(mw_http *h)
{
    if (h->p.type == HTTP_RESPONSE && h->p.http_minor == 0 && h->te) return 0;
    return llhttp_should_keep_alive(&h->p);
}

/* The span of the field being parsed. */
static hspan *cur_span(mw_http *h)
{
    return h->p.type == HTTP_REQUEST ? &h->cur : &h->hdrs[h->nhdrs - 1];
}

/* The request target (requests) or the reason phrase (responses): one span, which llhttp
 * may deliver in pieces; longer than max_line is refused (414 for a request). */
static int on_first_line_span(llhttp_t *p, const char *at, size_t len)
{
    mw_http *h = H(p);
    if (!h->url_open) {
        h->url_open = 1;
        h->url_off = (uint32_t)(at - h->base);
        h->url_len = 0;
    }
    h->url_len += (uint32_t)len;
    if (h->url_len > h->max_line)
        return p->type == HTTP_REQUEST ? fail(p, 414, "request line too long") : fail(p, 0, "status line too long");
    return 0;
}

/* Appends to the trailer record buffer (trailers arrive after the head was consumed, so
 * they are copied, never kept as spans). */
static int trailer_add(mw_http *h, const char *s, size_t n)
{
    if (mw_buf_len(&h->trailers) + n > h->max_head) return -1;
    size_t avail;
    char *w = mw_buf_reserve(&h->trailers, NULL, n ? n : 1, &avail);
    if (!w) return -1;
    memcpy(w, s, n);
    mw_buf_commit(&h->trailers, n);
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    mw_http *h = H(p);
    if (h->head_done) {  /* a trailer field */
        if (!h->in_trailer_field && mw_buf_len(&h->trailers) > 0 && trailer_add(h, "\n", 1) < 0)
            return fail(p, 431, "trailers too large");
        h->in_trailer_field = 1;
        if (trailer_add(h, at, len) < 0) return fail(p, 431, "trailers too large");
        return 0;
    }
    if (!h->field_open) {
        if ((size_t)h->nhdrs >= h->max_headers) return fail(p, 431, "too many header fields");
        if (p->type == HTTP_RESPONSE && h->nhdrs == h->caphdrs) {
            int cap = h->caphdrs ? h->caphdrs * 2 : 16;
            hspan *n = realloc(h->hdrs, (size_t)cap * sizeof *n);
            if (!n) return fail(p, 500, "not enough memory");
            h->hdrs = n;
            h->caphdrs = cap;
        }
        h->nhdrs++;
        hspan *sp = cur_span(h);
        sp->noff = (uint32_t)(at - h->base);
        sp->nlen = sp->voff = sp->vlen = 0;
        h->field_open = 1;
        h->value_open = h->value_done = 0;
    }
    cur_span(h)->nlen += (uint32_t)len;
    return 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    mw_http *h = H(p);
    if (h->head_done) {
        h->in_trailer_field = 0;
        return trailer_add(h, ":", 1) < 0 ? fail(p, 431, "trailers too large") : 0;
    }
    h->field_open = 0;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    mw_http *h = H(p);
    if (h->head_done) return trailer_add(h, at, len) < 0 ? fail(p, 431, "trailers too large") : 0;
    /* a value with no field before it: an empty header name */
    if (!h->value_open && (h->nhdrs == 0 || h->value_done)) return fail(p, 400, "empty header name");
    hspan *sp = cur_span(h);
    if (!h->value_open) {
        h->value_open = 1;
        sp->voff = (uint32_t)(at - h->base);
        sp->vlen = 0;
    }
    sp->vlen += (uint32_t)len;
    return 0;
}

static int name_is(const mw_http *h, const hspan *sp, const char *name, size_t n)
{
    return sp->nlen == n && strncasecmp(h->base + sp->noff, name, n) == 0;
}


/* trims optional white space around a value span */
static void value_of(const mw_http *h, const hspan *sp, const char **v, size_t *n)
{
    const char *s = h->base + sp->voff;
    size_t len = sp->vlen;
    while (len > 0 && (s[0] == ' ' || s[0] == '\t')) { s++; len--; }
    while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t')) len--;
    *v = s;
    *n = len;
}

/* reg-name characters (RFC 3986: unreserved, sub-delims, and '%' of pct-encoded) */
static unsigned char regname_char[256];

static void init_regname(void)
{
    for (int c = 0; c < 256; c++)
        regname_char[c] = (unsigned char)(c != 0 && (isalnum(c) || strchr("-._~!$&'()*+,;=%", c)));
}

/* RFC 3986 host [":" port]: reg-name, IPv4 or [IP-literal]. */
static int valid_host(const char *s, size_t n)
{
    size_t i = 0;
    if (n == 0) return 0;
    if (s[0] == '[') {
        while (i < n && s[i] != ']') {
            char c = s[i];
            if (i > 0 && !isxdigit((unsigned char)c) && c != ':' && c != '.') return 0;
            i++;
        }
        if (i == n) return 0;
        i++;
    } else {
        for (; i < n && s[i] != ':'; i++)
            if (!regname_char[(unsigned char)s[i]]) return 0;
    }
    if (i < n) {
        if (s[i] != ':') return 0;
        for (i++; i < n; i++)
            if (!isdigit((unsigned char)s[i])) return 0;
    }
    return 1;
}

/* An absolute-form request target (scheme "://" authority [path] ["?" query]): sets *auth,
 * *alen to its authority and returns where its path (or query) starts; NULL for the other
 * forms (origin "/...", asterisk "*", authority "host:port" of CONNECT). */
static const char *absolute_form(const char *url, size_t n, const char **auth, size_t *alen)
{
    if (n == 0 || url[0] == '/' || url[0] == '*') return NULL;
    const char *sch = memchr(url, ':', n);
    if (!sch || (size_t)(sch - url) + 3 > n || sch[1] != '/' || sch[2] != '/') return NULL;
    const char *a = sch + 3, *end = url + n, *e = a;
    while (e < end && *e != '/' && *e != '?') e++;
    *auth = a;
    *alen = (size_t)(e - a);
    return e;
}

/* A CONNECT's target: authority-form, a host and a port (RFC 9112 §3.2.3) */
static int authority_form(const char *url, size_t n)
{
    if (!valid_host(url, n)) return 0;
    const char *p = url[0] == '[' ? memchr(url, ']', n) : NULL;     /* (valid_host: there is one) */
    p = p ? p + 1 : memchr(url, ':', n);
    return p && p + 1 < url + n && *p == ':';
}

/* Why a request target does not fit its method (RFC 9112 §3.2), or NULL: asterisk-form is
 * OPTIONS's alone, a CONNECT's is authority-form and no other method's is; no form has a
 * fragment (a client leaves it out). Origin- and absolute-form are llhttp's. */
static const char *target_bad(const char *url, size_t n, int method)
{
    if (memchr(url, '#', n)) return "fragment in the request target";
    if (method == HTTP_CONNECT) return authority_form(url, n) ? NULL : "CONNECT needs an authority-form target";
    if (n > 0 && url[0] == '*' && (n != 1 || method != HTTP_OPTIONS)) return "asterisk-form target for a method other than OPTIONS";
    return NULL;
}

/* A request's header field, once whole: counts Host, Transfer-Encoding and Content-Length,
 * checks Host and Transfer-Encoding, notes Expect: 100-continue. The first bad field's
 * verdict is kept for the end of the head (on_headers_complete), where the version is
 * judged first. */
static void check_field(mw_http *h, const hspan *sp)
{
    const char *v;
    size_t n;
    const char *bad = NULL;
    int status = 400;
    if (name_is(h, sp, "host", 4)) {
        h->hosts++;
        value_of(h, sp, &v, &n);
        if (!valid_host(v, n)) bad = "invalid Host header";
    } else if (name_is(h, sp, "transfer-encoding", 17)) {
        h->te++;
        value_of(h, sp, &v, &n);
        if (!(n == 7 && strncasecmp(v, "chunked", 7) == 0)) {
            bad = "invalid Transfer-Encoding";
            /* a coding we do not implement, with chunked last: 501; else 400 */
            if (n > 7 && strncasecmp(v + n - 7, "chunked", 7) == 0) {
                const char *c = v + n - 8;
                while (c > v && (*c == ' ' || *c == '\t')) c--;
                if (*c == ',') {
                    bad = "unsupported transfer coding";
                    status = 501;
                }
            }
        }
    } else if (name_is(h, sp, "content-length", 14)) {
        h->cl++;
    } else if (name_is(h, sp, "expect", 6)) {
        value_of(h, sp, &v, &n);
        /* ignored from HTTP/1.0 (RFC 9110 §10.1.1): no 1xx goes to an HTTP/1.0 client */
        if (n == 12 && strncasecmp(v, "100-continue", 12) == 0 && h->p.http_minor >= 1) h->expect_continue = 1;
    }
    if (bad && !h->ferr_status) {
        h->ferr_status = status;
        h->ferr_msg = bad;
    }
}

/* A response's header field, once whole: its Transfer-Encoding may only be chunked (llhttp
 * undoes chunked; a coding before it, "gzip, chunked", would reach the caller still coded). */
static void check_response_field(mw_http *h, const hspan *sp)
{
    if (!name_is(h, sp, "transfer-encoding", 17)) return;
    h->te++;
    const char *v;
    size_t n;
    value_of(h, sp, &v, &n);
    if (!(n == 7 && strncasecmp(v, "chunked", 7) == 0) && !h->ferr_status) {
        h->ferr_status = 502;
        h->ferr_msg = "unsupported transfer coding in the response";
    }
}

static int on_header_value_complete(llhttp_t *p)
{
    mw_http *h = H(p);
    if (h->head_done) return 0;
    h->value_open = 0;
    h->value_done = 1;
    if (h->nhdrs > 0) {
        if (p->type == HTTP_REQUEST) check_field(h, &h->cur);
        else check_response_field(h, cur_span(h));
    }
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    mw_http *h = H(p);
    if (p->type == HTTP_REQUEST) {
        if (p->http_major == 0) {
            /* "GET /" (HTTP/0.9 style, no version at all) is malformed; "HTTP/0.9" is a version */
            const char *after = h->base + h->url_off + h->url_len;
            if (strncmp(after, " HTTP/", 6) == 0) return fail(p, 505, "HTTP version not supported");
            return fail(p, 400, "missing HTTP version");
        }
        if (p->http_major != 1 || p->http_minor > 1) return fail(p, 505, "HTTP version not supported");
        if (h->ferr_status) return fail(p, h->ferr_status, h->ferr_msg);
        int hosts = h->hosts, te = h->te, cl = h->cl;
        if (hosts > 1 || (hosts == 0 && p->http_minor == 1)) return fail(p, 400, "missing or repeated Host header");
        if (te > 1) return fail(p, 400, "repeated Transfer-Encoding");
        if (te && cl) return fail(p, 400, "Content-Length with Transfer-Encoding");
        if (cl > 1) return fail(p, 400, "repeated Content-Length");
        if (te && p->http_minor == 0) return fail(p, 400, "Transfer-Encoding in HTTP/1.0");
        const char *url = h->base + h->url_off, *bad = target_bad(url, h->url_len, p->method);
        if (bad) return fail(p, 400, bad);
        /* an absolute-form target's authority replaces Host (RFC 9112 §3.2.2, hc:headers_of) */
        const char *auth;
        size_t alen;
        if (absolute_form(url, h->url_len, &auth, &alen) && !valid_host(auth, alen))
            return fail(p, 400, "invalid authority in the request target");
        /* the value is "chunked" with optional white space (check_field): llhttp 8 takes a
         * space after it but not a tab (RFC 9110 §5.6.3 allows both) */
        if (te) p->flags |= F_CHUNKED;
    } else {
        /* an answer is HTTP/1.x with a status from 100 to 599 (RFC 9110 §15: llhttp takes
         * any three digits) */
        if (p->http_major != 1 || p->http_minor > 1) return fail(p, 502, "unsupported HTTP version in the response");
        if (p->status_code < 100 || p->status_code > 599) return fail(p, 502, "bad status code in the response (not 100..599)");
        if (h->ferr_status) return fail(p, h->ferr_status, h->ferr_msg);
        /* chunked applied twice (as the request side: RFC 9112 §6.1), one field or two */
        if (h->te > 1) return fail(p, 502, "repeated Transfer-Encoding in the response");
        /* reason-phrase = *( HTAB / SP / VCHAR / obs-text ) (RFC 9112 §4): no control byte
         * reaches res.reason (a terminal escape in a log line) */
        const unsigned char *r = (const unsigned char *)h->base + h->url_off;
        for (uint32_t i = 0; i < h->url_len; i++)
            if ((r[i] < 0x20 && r[i] != '\t') || r[i] == 0x7f) return fail(p, 502, "invalid character in the reason phrase");
    }
    h->head_done = 1;
    /* no body whatever the head says: answers to HEAD, and 1xx/204/304 */
    if (p->type == HTTP_RESPONSE && (h->skip_body || p->status_code < 200 || p->status_code == 204 ||
                                     p->status_code == 304))
        return 1;
    return HPE_PAUSED;  /* stop here: the head is handed to Lua before any body byte */
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    mw_http *h = H(p);
    h->body_seen += len;
    if (h->discard) return 0;
    if (h->body_seen > h->body_max) return fail(p, 413, "body too large");
    size_t avail;
    char *w = mw_buf_reserve(&h->body, NULL, len, &avail);
    if (!w) return fail(p, 500, "not enough memory");
    memcpy(w, at, len);
    mw_buf_commit(&h->body, len);
    return 0;
}

static int on_chunk_header(llhttp_t *p)
{
    mw_http *h = H(p);
    h->ext_total = 0;    /* (called once the size line, extensions included, was parsed) */
    /* refuse before the data arrives: the chunk size is known now */
    if (p->content_length > h->body_max - h->body_seen) return fail(p, 413, "body too large");
    if (p->content_length == 0) {
        /* the last chunk: the trailer section starts where this pause leaves llhttp */
        h->tr_mark = 1;
        return HPE_PAUSED;
    }
    return 0;
}

/* chunk-ext = *( ";" chunk-ext-name [ "=" chunk-ext-val ] ): llhttp lets an empty name or
 * an empty value through. Extensions are read and dropped, so they count against no body
 * limit: a chunk's may take CHUNK_EXT_MAX bytes (a body cannot be made of them instead of
 * data, as CVE-2024-22019 did to Node) */
#define CHUNK_EXT_MAX 4096
static int on_chunk_ext_span(llhttp_t *p, const char *at, size_t len)
{
    mw_http *h = H(p);
    (void)at;
    if (len > CHUNK_EXT_MAX || (h->ext_total += (uint32_t)len) > CHUNK_EXT_MAX)
        return fail(p, 400, "chunk extensions too long");
    h->ext_len += (uint32_t)len;
    return 0;
}

static int on_chunk_ext_complete(llhttp_t *p)
{
    mw_http *h = H(p);
    if (h->ext_len == 0) return fail(p, 400, "empty chunk extension name or value");
    h->ext_len = 0;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    H(p)->msg_done = 1;
    return HPE_PAUSED;  /* never parse into a pipelined next request */
}

/* The callbacks table: written once (pthread_once), then only read, by every loop thread. */
static llhttp_settings_t settings;
static pthread_once_t settings_once = PTHREAD_ONCE_INIT;

static void init_settings(void)
{
    llhttp_settings_init(&settings);
    settings.on_message_begin = on_message_begin;
    settings.on_url = on_first_line_span;
    settings.on_status = on_first_line_span;
    settings.on_header_field = on_header_field;
    settings.on_header_field_complete = on_header_field_complete;
    settings.on_header_value = on_header_value;
    settings.on_header_value_complete = on_header_value_complete;
    settings.on_headers_complete = on_headers_complete;
    settings.on_body = on_body;
    settings.on_chunk_header = on_chunk_header;
    settings.on_chunk_extension_name = on_chunk_ext_span;
    settings.on_chunk_extension_value = on_chunk_ext_span;
    settings.on_chunk_extension_name_complete = on_chunk_ext_complete;
    settings.on_chunk_extension_value_complete = on_chunk_ext_complete;
    settings.on_message_complete = on_message_complete;
    init_regname();
}

/* ---- feeding llhttp ------------------------------------------------------------------- */

/* The rules for every line break of a head and of a trailer section, which llhttp (strict)
 * does not enforce everywhere: the LF follows a CR (no bare LF), and the line after it does
 * not start with SP or HTAB (obs-fold) nor with ':' (an empty field name). `before` is the
 * byte before the LF (-1: none), `after` the byte after it (-1: none, the section ended).
 * NULL, or the rule broken. */
static const char *line_break_bad(int before, int after)
{
    if (before != '\r') return "bare LF";
    if (after == ' ' || after == '\t') return "obsolete line folding";
    if (after == ':') return "empty field name";
    return NULL;
}

/* Scans the trailer-section bytes s[0, n) llhttp consumed with line_break_bad, each line
 * break once the byte after it is known; `end`: the section ended after them. */
static const char *scan_trailers(mw_http *h, const char *s, size_t n, int end)
{
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (h->tr_lf) {
            const char *bad = line_break_bad(h->tr_before, c);
            if (bad) return bad;
            h->tr_lf = 0;
        }
        if (c == '\n') {
            h->tr_lf = 1;
            h->tr_before = h->tr_last;
        }
        h->tr_last = c;
    }
    return end && h->tr_lf ? line_break_bad(h->tr_before, -1) : NULL;
}

/* Whether the request line ends in a well-formed "HTTP/d.d" CRLF (then an unsupported
 * version is a 505, not a 400; a bare CR or LF ending it is malformed, a 400). */
static int wellformed_version(const char *p, size_t len)
{
    const char *eol = memchr(p, '\r', len);
    if (!eol || eol - p < 9 || (size_t)(eol - p) + 1 >= len || eol[1] != '\n') return 0;
    const char *v = eol - 8;
    return memcmp(v, "HTTP/", 5) == 0 && isdigit((unsigned char)v[5]) && v[6] == '.' &&
           isdigit((unsigned char)v[7]) && v[-1] == ' ';
}

/* Resumes llhttp after a pause (e) that left it at `at`. llhttp pauses again right after
 * the end of a message whose head asked for an upgrade (HPE_PAUSED_UPGRADE): that pause is
 * taken here too, and left with llhttp_resume_after_upgrade, so a connection whose handler
 * declined the upgrade goes on with its next request (one that took it, a WebSocket, reads
 * the socket itself from then on). h->upgrade keeps the flag for the Lua layer. */
static void resume(mw_http *h, llhttp_errno_t e, const char *at)
{
    if (e == HPE_PAUSED) {
        llhttp_resume(&h->p);
        if (!(h->msg_done && h->p.upgrade)) return;
        e = llhttp_execute(&h->p, at, 0);
    }
    if (e == HPE_PAUSED_UPGRADE) {
        h->upgrade = 1;
        h->msg_done = 1;
        llhttp_resume_after_upgrade(&h->p);
    }
}

/* Runs llhttp over the unparsed buffered bytes. 0 ok (maybe paused), or a status
 * (400...) with h->err_msg set. */
/* llhttp 8 refuses a tab after a Content-Length value, where RFC 9110 §5.6.3 allows it as
 * optional white space (a space it takes). A Content-Length value is digits only, so a tab
 * anywhere in that field line is either such white space or an error either way: turned
 * into a space before llhttp sees it, the verdict is the same and the RFC's form passes.
 * Only head bytes are touched (up to the empty line); memchr keeps heads without a tab
 * (nearly all) to one scan. */
static void cl_tabs(mw_http *h, size_t from, size_t len)
{
    char *base = (char *)h->base;
    if (!memchr(base + from, '\t', len - from)) return;
    size_t line = from;
    while (line > 0 && base[line - 1] != '\n') line--;
    for (size_t i = from; i < len; i++) {
        char c = base[i];
        if (c == '\n') {
            if (i == line || (i == line + 1 && base[line] == '\r')) return;   /* the empty line */
            line = i + 1;
        } else if (c == '\t' && i >= line + 15 && strncasecmp(base + line, "content-length:", 15) == 0) {
            base[i] = ' ';
        }
    }
}

static int feed(mw_http *h)
{
    if (h->err_status) return h->err_status;  /* a verdict given before: the stream is broken */
    mw_buf *b = &h->s->rbuf;
    size_t len = mw_buf_len(b);
    h->base = mw_buf_head(b);
    if (h->parsed > len) h->parsed = len;
    llhttp_errno_t e;
    for (;;) {
        const char *from = h->base + h->parsed;
        if (!h->head_done) cl_tabs(h, h->parsed, len);
        e = llhttp_execute(&h->p, from, len - h->parsed);
        if (e != HPE_OK && e != HPE_PAUSED && e != HPE_PAUSED_UPGRADE) break;
        size_t to = e == HPE_OK ? len : (size_t)(llhttp_get_error_pos(&h->p) - h->base);
        if (h->tr_on) {
            const char *bad = scan_trailers(h, from, (size_t)(h->base + to - from), h->msg_done);
            if (bad) {
                h->msg_done = 0;   /* never "complete": nothing after it is read as a request */
                h->err_msg = bad;
                return h->err_status = 400;
            }
            if (h->msg_done) h->tr_on = 0;
        }
        h->parsed = to;
        if (e != HPE_OK) resume(h, e, h->base + to);
        if (!h->tr_mark) return 0;
        /* paused at the last chunk: scan the trailer section from here, right after the
         * last-chunk line's CRLF */
        h->tr_mark = 0;
        h->tr_on = 1;
        h->tr_lf = 1;
        h->tr_before = '\r';
        h->tr_last = '\n';
        if (h->parsed == len) return 0;
    }
    if (h->err_status) return h->err_status;  /* our verdict from a callback */
    h->err_msg = llhttp_get_error_reason(&h->p);
    if (!h->err_msg) h->err_msg = llhttp_errno_name(e);
    if (e == HPE_INVALID_VERSION && wellformed_version(h->base, len)) {
        h->err_msg = "HTTP version not supported";
        return 505;
    }
    return 400;
}

/* nil, msg, status (the code the server answers with) on the server side; nil, msg, "http"
 * on the client side, where there is nobody to answer. */
static int pushverdict(lua_State *L, const char *msg, int status)
{
    mw_http *h = lua_touserdata(L, 1);
    lua_pushnil(L);
    lua_pushstring(L, msg);
    if (h->p.type == HTTP_RESPONSE) lua_pushstring(L, status == 413 ? "toolarge" : "http");
    else if (status > 0) lua_pushinteger(L, status);
    else lua_pushnil(L);
    return 3;
}

static mw_http *checkhc(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    if (!h->s) luaL_error(L, "attempt to use a closed HTTP connection");
    return h;
}

/* ---- request heads ------------------------------------------------------------------------ */

static int hex(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    c |= 0x20;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Pushes the percent-decoded s[0, n). */
void mw_http_push_decoded(lua_State *L, const char *s, size_t n)
{
    if (!memchr(s, '%', n)) {
        lua_pushlstring(L, s, n);
        return;
    }
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, n);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int a, c;
        if (s[i] == '%' && i + 2 < n && (a = hex((unsigned char)s[i + 1])) >= 0 &&
            (c = hex((unsigned char)s[i + 2])) >= 0) {
            out[k++] = (char)(a * 16 + c);
            i += 2;
        } else {
            out[k++] = s[i];
        }
    }
    luaL_pushresultsize(&b, k);
}

void mw_http_add_multi(lua_State *L, int reqidx, int kidx, int oldidx, const char *v, size_t vn)
{
    if (lua_getfield(L, reqidx, "_multi") == LUA_TNIL) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, reqidx, "_multi");
    }
    lua_pushvalue(L, kidx);
    if (lua_rawget(L, -2) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_createtable(L, 2, 0);
        lua_pushvalue(L, oldidx);
        lua_rawseti(L, -2, 1);
        lua_pushvalue(L, kidx);
        lua_pushvalue(L, -2);
        lua_rawset(L, -4);
    }
    lua_pushlstring(L, v, vn);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    lua_pop(L, 2);  /* the list and _multi */
}

/* Pushes the headers table (lower-case name -> value; repeated fields joined). A field seen
 * more than once is also listed, every value in order, in reqidx's `_multi[name]`. */
static void build_headers(lua_State *L, mw_http *h, int reqidx)
{
    lua_createtable(L, 0, h->nhdrs);
    int hidx = lua_gettop(L);
    char small[64];
    for (int i = 0; i < h->nhdrs; i++) {
        const hspan *sp = &h->hdrs[i];
        const char *name = h->base + sp->noff;
        const char *v;
        size_t vn;
        value_of(h, sp, &v, &vn);
        if (sp->nlen <= sizeof small) {
            for (uint32_t j = 0; j < sp->nlen; j++) small[j] = (char)tolower((unsigned char)name[j]);
            lua_pushlstring(L, small, sp->nlen);
        } else {
            luaL_Buffer b;
            char *o = luaL_buffinitsize(L, &b, sp->nlen);
            for (uint32_t j = 0; j < sp->nlen; j++) o[j] = (char)tolower((unsigned char)name[j]);
            luaL_pushresultsize(&b, sp->nlen);
        }
        int kidx = lua_gettop(L);
        lua_pushvalue(L, kidx);
        if (lua_rawget(L, hidx) == LUA_TNIL) {
            lua_pop(L, 1);
            lua_pushlstring(L, v, vn);
            lua_rawset(L, hidx);
            continue;
        }
        /* repeated: the list of every value, in request._multi[name] */
        int oldidx = lua_gettop(L);
        mw_http_add_multi(L, reqidx, kidx, oldidx, v, vn);
        /* joined value (cookies with "; ", the rest with ", ") */
        int cookie = sp->nlen == 6 && strncasecmp(name, "cookie", 6) == 0;
        lua_pushstring(L, cookie ? "; " : ", ");
        lua_pushlstring(L, v, vn);
        lua_concat(L, 3);
        lua_rawset(L, hidx);
    }
}

/* Response field names (client side), interned once: read_request has them as upvalues
 * 1..K_COUNT, so building a message never looks a C string up in Lua's string cache. */
enum { K_VERSION = 1, K_HEADERS, K_KEEPALIVE, K_CONN, K_STATUS, K_REASON, K_COUNT = K_REASON };
static const char *const key_names[] = { "version", "headers", "keepalive", "_conn", "status", "reason" };
/* after the keys and the metatable: common request values, interned once */
enum { V_11 = K_COUNT + 2, V_10, V_GET, V_HEAD, V_POST, V_LAST = V_POST };
static const char *const value_names[] = { "1.1", "1.0", "GET", "HEAD", "POST" };

/* Pushes the interned string k (an upvalue of read_request, see above). */
#define KEY(L, k) lua_pushvalue((L), lua_upvalueindex(k))

/* Builds the request table (metatable: user value 2) from the parsed head. Its fields are
 * array slots (request.lua resolves the public names): setting a named field on a new table
 * costs Lua a hash insertion each, an array slot a fraction of that. */
static void build_request(lua_State *L, mw_http *h)
{
    /* [1] the connection, [2] the response (request.lua), [3] whether the message ended with
     * its head (no body: the server need not ask the connection), [4] the head's bytes,
     * until the headers table is built, [5] upgrade; [6] method [7] target [8] version
     * [9] path [10] keepalive. The hash part has room for the fields request.lua caches on
     * first use. */
    lua_createtable(L, 10, 4);
    switch (h->p.method) {
    case HTTP_GET: KEY(L, V_GET); break;
    case HTTP_HEAD: KEY(L, V_HEAD); break;
    case HTTP_POST: KEY(L, V_POST); break;
    default: lua_pushstring(L, llhttp_method_name((llhttp_method_t)h->p.method));
    }
    lua_rawseti(L, -2, 6);
    const char *url = h->base + h->url_off;
    size_t ulen = h->url_len;
    lua_pushlstring(L, url, ulen);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, 7);
    KEY(L, h->p.http_minor == 1 ? V_11 : V_10);
    lua_rawseti(L, -3, 8);
    /* path and query; absolute-form targets keep only their path (none: "/") */
    const char *path = url, *auth;
    size_t plen = ulen, alen;
    const char *after = absolute_form(url, ulen, &auth, &alen);
    if (after) {
        plen = ulen - (size_t)(after - url);
        path = after;
    }
    const char *q = memchr(path, '?', plen);
    size_t pn = q ? (size_t)(q - path) : plen;
    if (pn == 0) lua_pushliteral(L, "/");
    else if (path == url && pn == ulen && !memchr(path, '%', pn)) lua_pushvalue(L, -1);  /* the target */
    else mw_http_push_decoded(L, path, pn);
    lua_rawseti(L, -3, 9);
    lua_pop(L, 1);      /* the target */
    /* query_string is cut from target on first use (request.lua) */
    /* headers: the table is built on first use (hc:headers_of, request.lua) from the head's
     * bytes, kept in slot 4 until then: a handler that never looks at a header costs no
     * table and no string per header */
    lua_pushlstring(L, h->base, h->parsed);
    lua_rawseti(L, -2, 4);
    h->req_keepalive = msg_keepalive(h);
    h->req_http10 = h->p.http_minor != 1;
    h->req_head = h->p.method == HTTP_HEAD;
    h->req_connect = h->p.method == HTTP_CONNECT;
    lua_pushboolean(L, h->req_keepalive);
    lua_rawseti(L, -2, 10);
    /* socket and _server are looked up on first use (request.lua: hc:socket(), hc:server()) */
    /* [5] is set for every request, false too: the server reads it for each one (the upgrade
     * hand-off), and reading a missing slot would call the request's __index */
    /* (a CONNECT too: what follows its head is a tunnel's bytes, never requests) */
    lua_pushboolean(L, h->upgrade || (h->p.flags & F_CONNECTION_UPGRADE) || h->p.method == HTTP_CONNECT);
    lua_rawseti(L, -2, 5);
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, 1);
    lua_getiuservalue(L, 1, 2);
    lua_setmetatable(L, -2);
}

/* Every line break of a complete head (request or response) by line_break_bad: llhttp
 * (strict) takes an obs-fold, and reports the folded value as spans that on_header_value
 * adds up as if contiguous (the CR LF and the fold's white space end up in the value). */
static const char *head_breaks_bad(const char *p, size_t n)
{
    /* from one LF to the next (memchr: a few calls per head rather than a test per byte) */
    const char *end = p + n;
    for (const char *lf = memchr(p, '\n', n); lf; lf = memchr(lf + 1, '\n', (size_t)(end - lf - 1))) {
        const char *bad = line_break_bad(lf == p ? -1 : lf[-1], lf + 1 < end ? lf[1] : -1);
        if (bad) return bad;
        if (lf + 1 >= end) break;
    }
    return NULL;
}

/* What llhttp lets through even in strict mode, checked over the whole head once it is
 * complete: every LF preceded by CR (no bare LF), no obs-fold (a line starting with SP or
 * HTAB), no line starting with ':' (empty field name), and a request line of exactly
 * "method SP target SP version". */
static const char *strict_head(const char *p, size_t n)
{
    const char *eol = memchr(p, '\r', n);
    if (!eol) return "malformed request line";
    int spaces = 0;
    for (const char *c = p; c < eol; c++) {
        if (*c == ' ') {
            if (c == p || c[-1] == ' ') return "malformed request line";
            spaces++;
        }
    }
    if (spaces != 2) return "malformed request line";
    return head_breaks_bad(p, n);
}

/* Builds the response table (client side). */
static void build_response(lua_State *L, mw_http *h)
{
    lua_createtable(L, 0, 12);  /* room for what the client adds (url, _c, _deadline, ...) */
    KEY(L, K_STATUS);
    lua_pushinteger(L, h->p.status_code);
    lua_rawset(L, -3);
    KEY(L, K_REASON);
    lua_pushlstring(L, h->base + h->url_off, h->url_len);
    lua_rawset(L, -3);
    KEY(L, K_VERSION);
    lua_pushstring(L, h->p.http_minor == 1 ? "1.1" : "1.0");
    lua_rawset(L, -3);
    int residx = lua_gettop(L);
    KEY(L, K_HEADERS);
    build_headers(L, h, residx);
    if (lua_getiuservalue(L, 1, 3) == LUA_TTABLE) lua_setmetatable(L, -2);
    else lua_pop(L, 1);
    lua_rawset(L, -3);
    KEY(L, K_KEEPALIVE);
    lua_pushboolean(L, msg_keepalive(h));
    lua_rawset(L, -3);
    KEY(L, K_CONN);
    lua_pushvalue(L, 1);
    lua_rawset(L, -3);
    lua_getiuservalue(L, 1, 2);
    lua_setmetatable(L, -2);
}

static int read_request_k(lua_State *L, int status, lua_KContext ctx);

/* RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF) received before the
 * request line (old clients send one after a POST body). Up to MW_BLANK_LINES of them are
 * dropped from the buffer; more are left to the request line check, which refuses them.
 * Returns 1 when the buffer holds a lone CR that may be the start of one (wait for more). */
#define MW_BLANK_LINES 8

static int skip_blank_lines(mw_http *h)
{
    mw_buf *b = &h->s->rbuf;
    const char *p = mw_buf_head(b);
    size_t n = mw_buf_len(b), k = 0;
    while (h->blank_lines < MW_BLANK_LINES && n - k >= 2 && p[k] == '\r' && p[k + 1] == '\n') {
        k += 2;
        h->blank_lines++;
    }
    if (k) mw_buf_consume(b, k);
    return h->blank_lines < MW_BLANK_LINES && n - k == 1 && p[k] == '\r';
}

/* A head's deadline passed: in a wait, or between reads of a peer that always had bytes. */
static int head_timed_out(lua_State *L, mw_http *h)
{
    if (mw_buf_len(&h->s->rbuf) == 0) return mw_pushfail(L, "timeout", "timeout");  /* idle */
    if (h->p.type == HTTP_RESPONSE) return mw_pushfail(L, "timeout", "timeout");
    return pushverdict(L, "request head timeout", 408);
}

/* Whether this request's head has begun, for its timer: a byte past the one empty line
 * before it that RFC 9112 §2.2 says to ignore (old clients send one after a POST body; it may
 * sit in the buffer from the last request), or a second empty line. Skipped lines never
 * restart the timer: a CRLF every few seconds must not hold the connection. `len`: what the
 * buffer holds past the skipped lines (a lone CR may be the first line's start). */
static int head_begun(mw_http *h, size_t len)
{
    if (h->blank_lines > 1) return 1;
    if (len == 0) return 0;
    return !(len == 1 && h->blank_lines == 0 && *mw_buf_head(&h->s->rbuf) == '\r');
}

static int read_request_step(lua_State *L, mw_http *h, mw_task *t)
{
    mw_sock *s = h->s;
    for (;;) {
        if (mw_buf_len(&s->rbuf) > h->parsed &&
            !(h->p.type == HTTP_REQUEST && h->parsed == 0 && skip_blank_lines(h)) && mw_buf_len(&s->rbuf) > 0) {
            int st = feed(h);
            if (st) return pushverdict(L, h->err_msg, st);
        }
        size_t len = mw_buf_len(&s->rbuf);
        if (!h->head_armed && head_begun(h, len)) {
            h->head_armed = 1;
            h->deadline = mw_sched_after(s->rt, (double)h->head_timeout / 1e9);
        }
        if (h->head_done) {
            if (h->parsed > h->max_head)
                return pushverdict(L, h->p.type == HTTP_REQUEST ? "request head too large" : "response head too large", 431);
            if (h->p.type == HTTP_REQUEST) {
                const char *bad = strict_head(h->base, h->parsed);
                if (bad) return pushverdict(L, bad, 400);
                build_request(L, h);
            } else {
                /* RFC 9112 §5.2: an obs-fold is refused rather than unfolded (code "http") */
                const char *bad = head_breaks_bad(h->base, h->parsed);
                if (bad) return pushverdict(L, bad, 0);
                build_response(L, h);
            }
            /* the head is in Lua now: drop it, then let llhttp reach the end of a message
             * without a body (it completes on a zero-length execute) */
            mw_buf_consume(&s->rbuf, h->parsed);
            h->msg_bytes += h->parsed;
            h->parsed = 0;
            h->base = mw_buf_head(&s->rbuf);
            llhttp_errno_t e = llhttp_execute(&h->p, h->base, 0);
            if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) resume(h, e, h->base);
            if (h->p.type == HTTP_REQUEST) {
                lua_pushboolean(L, h->msg_done);
                lua_rawseti(L, -2, 3);
            }
            return mw_sched_checkpoint(L, t, 1);
        }
        if (h->p.type == HTTP_REQUEST) {
            if (!h->url_open && len > h->max_line) return pushverdict(L, "request line too long", 414);
            if (len > h->max_head) return pushverdict(L, "request head too large", 431);
        } else if (len > h->max_head) {
            return pushverdict(L, "response head too large", 0);
        }
        uint32_t want = EPOLLIN;
        int r = mw_stream_fill(s, 4096, &want);
        if (r == 1) {
            if (h->head_armed && mw_sched_expired(t, h->deadline)) return head_timed_out(L, h);  /* never waited */
            continue;
        }
        if (r == 0) {
            if (len == 0) return mw_pushfail(L, "closed", "closed");
            return pushverdict(L, h->p.type == HTTP_REQUEST ? "connection closed in the request head"
                                                            : "connection closed in the response head", 0);
        }
        if (r == -3) return mw_stream_pusherr(L, s, errno);
        if (len == 0) mw_buf_release(&s->rbuf, &s->rt->pool);
        h->idle_wait = len == 0;
        /* nothing buffered: the idle deadline, or the head's if only empty lines came and it
         * is sooner */
        int64_t until = h->deadline;
        if (len == 0 && (!h->head_armed || h->idle_deadline < until)) until = h->idle_deadline;
        return mw_sock_wait(L, s, t, MW_ROLE_READ, want, until, read_request_k, 0);
    }
}

static int read_request_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_http *h = lua_touserdata(L, 1);
    mw_task *t = h->s->rt->current;
    int why = mw_sched_reason(t);
    (void)status; (void)ctx;
    h->idle_wait = 0;
    if (why == MW_WAKE_TIMEOUT) return head_timed_out(L, h);
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (h->s->closed) return mw_pushfail(L, "closed", "closed");
    return read_request_step(L, h, t);
}

static void reset_message(mw_http *h)
{
    h->head_done = h->msg_done = h->upgrade = 0;
    h->err_status = 0;
    h->expect_continue = 0;
    h->parsed = 0;
    h->body_seen = 0;
    h->body_max = UINT64_MAX;
    h->discard = 0;
    h->in_trailer_field = 0;
    h->tr_mark = h->tr_on = 0;
    h->blank_lines = 0;
    h->ext_len = h->ext_total = 0;
    h->msg_bytes = 0;
    mw_buf_free(&h->body, NULL);
    mw_buf_free(&h->trailers, NULL);
}

/* ---- lean responses (the load generator): status and size only, nothing built ---------- */

static int lean_k(lua_State *L, int status, lua_KContext ctx);

static int lean_step(lua_State *L, mw_http *h, mw_task *t)
{
    mw_sock *s = h->s;
    for (int fills = 0;;) {
        size_t len = mw_buf_len(&s->rbuf);
        if (len > h->parsed || (h->head_done && !h->msg_done)) {
            int st = feed(h);
            if (st) return pushverdict(L, h->err_msg, st);
            if (h->head_done) {
                mw_buf_consume(&s->rbuf, h->parsed);
                h->msg_bytes += h->parsed;
                h->parsed = 0;
            }
        }
        if (h->msg_done && h->p.status_code < 200 && h->p.status_code != 101) {
            /* an interim response (100 Continue, 103 Early Hints) is not the answer: read on
             * to the final one, as the client does (its bytes count) */
            h->head_done = h->msg_done = 0;
            continue;
        }
        if (h->msg_done) {
            lua_pushinteger(L, h->p.status_code);
            lua_pushinteger(L, (lua_Integer)h->msg_bytes);
            lua_pushboolean(L, msg_keepalive(h));
            return 3;
        }
        if (h->head_done && mw_buf_len(&s->rbuf) > 0) continue;
        if (!h->head_done && mw_buf_len(&s->rbuf) > h->max_head) return pushverdict(L, "response head too large", 0);
        uint32_t want = EPOLLIN;
        int r = mw_stream_fill(s, 16384, &want);
        if (r == 1) {
            /* (as read_body_step: a peer that never lets this wait still times out) */
            if (fills++ && mw_sched_expired(t, h->deadline)) return mw_pushfail(L, "timeout", "timeout");
            continue;
        }
        if (r == 0) {
            if (h->head_done && llhttp_message_needs_eof(&h->p) && !mw_tls_truncated(s)) {
                llhttp_finish(&h->p);
                h->msg_done = 1;
                continue;
            }
            if (!h->head_done && mw_buf_len(&s->rbuf) == 0) return mw_pushfail(L, "closed", "closed");
            return pushverdict(L, "connection closed in the response", 0);
        }
        if (r == -3) return mw_stream_pusherr(L, s, errno);
        return mw_sock_wait(L, s, t, MW_ROLE_READ, want, h->deadline, lean_k, 0);
    }
}

static int lean_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_http *h = lua_touserdata(L, 1);
    mw_task *t = h->s->rt->current;
    int why = mw_sched_reason(t);
    (void)status; (void)ctx;
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (h->s->closed) return mw_pushfail(L, "closed", "closed");
    return lean_step(L, h, t);
}

/* http_count(s) -> how many complete requests the bytes hold (a pipelined batch) */
static int l_http_count(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    const char *end = s + n;
    int count = 0;
    /* CRLFCRLF ends a head, and a Content-Length in it tells how much body to skip */
    const char *c = s;
    while (c < end) {
        const char *he = memmem(c, (size_t)(end - c), "\r\n\r\n", 4);
        if (!he) break;
        size_t body = 0;
        for (const char *l = c; l < he; ) {
            const char *le = memmem(l, (size_t)(he - l), "\r\n", 2);
            if (!le) le = he;
            if ((size_t)(le - l) > 15 && strncasecmp(l, "content-length:", 15) == 0) body = (size_t)strtoull(l + 15, NULL, 10);
            l = le + 2;
        }
        count++;
        /* a body longer than the bytes left (a huge or bogus Content-Length) ends the batch */
        if (body > (size_t)(end - (he + 4))) break;
        c = he + 4 + body;
    }
    lua_pushinteger(L, count);
    return 1;
}

/* isatty(fd) -> boolean */
static int l_isatty(lua_State *L)
{
    lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
    return 1;
}

/* hc:read_lean([timeout [, head_request]]) -> status, bytes, keepalive | nil, err, code: reads one whole
 * response (head and body), keeping only its status and size */
static int hc_read_lean(lua_State *L)
{
    mw_http *h = checkhc(L);
    if (h->s->closed) return mw_pushfail(L, "closed", "closed");
    double timeout = luaL_optnumber(L, 2, -1);
    int head = lua_toboolean(L, 3);
    if (!h->msg_done && (h->head_done || h->parsed)) return luaL_error(L, "the previous message was not read to its end");
    mw_task *t = mw_sock_claim(L, h->s, MW_ROLE_READ);
    lua_settop(L, 1);
    reset_message(h);
    h->discard = 1;
    h->skip_body = head;
    h->deadline = mw_sched_after(h->s->rt, timeout);
    return lean_step(L, h, t);
}

/* hc:read_request([idle_timeout, head_timeout [, head_request]]) -> request | nil, msg, status|nil
 * status is the code to answer with (400, 408, 413, 414, 431, 501, 505); nil: just close.
 * Without timeouts: the server's (its `timeouts` table, read when hc was made). "closed"
 * once hc:closing() was called. */
static int hc_read_request(lua_State *L)
{
    mw_http *h = hc_of(L, 1);
    if (!h) h = mw_checkudata_up(L, 1, K_COUNT + 1, HC_MT);   /* upvalues: keys, metatable */
    if (!h->s) luaL_error(L, "attempt to use a closed HTTP connection");
    if (h->s->closed || h->closing) return mw_pushfail(L, "closed", "closed");
    double idle = h->idle_s, head = h->head_s;
    if (lua_gettop(L) > 1) {
        idle = luaL_optnumber(L, 2, -1);
        head = luaL_optnumber(L, 3, -1);
    }
    if (!h->msg_done && (h->head_done || h->parsed)) return luaL_error(L, "the previous message's body was not read to its end");
    h->skip_body = lua_toboolean(L, 4);
    mw_task *t = mw_sock_claim(L, h->s, MW_ROLE_READ);
    lua_settop(L, 1);
    reset_message(h);
    h->idle_deadline = mw_sched_after(h->s->rt, idle);
    h->head_timeout = head < 0 ? -1 : (int64_t)(head * 1e9);
    h->deadline = mw_sched_after(h->s->rt, head);
    h->head_armed = 0;                  /* (read_request_step: bytes already buffered start it now) */
    return read_request_step(L, h, t);
}

/* ---- bodies --------------------------------------------------------------------------- */

/* mode: 0 whole body (up to max), 1 next chunk, 2 discard (up to max) */
static int read_body_k(lua_State *L, int status, lua_KContext ctx);

static int body_result(lua_State *L, mw_http *h, int mode)
{
    if (mode == 2) {
        mw_buf_free(&h->body, NULL);
        lua_pushboolean(L, 1);
        return 1;
    }
    if (mode == 1 && mw_buf_len(&h->body) == 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushlstring(L, mw_buf_head(&h->body), mw_buf_len(&h->body));
    mw_buf_free(&h->body, NULL);
    return 1;
}

static int body_timed_out(lua_State *L, mw_http *h)
{
    if (h->p.type == HTTP_RESPONSE) return mw_pushfail(L, "timeout", "timeout");
    return pushverdict(L, "request body timeout", 408);
}

static int read_body_step(lua_State *L, mw_http *h, mw_task *t, int mode)
{
    mw_sock *s = h->s;
    for (int fills = 0;;) {
        if (!h->msg_done && mw_buf_len(&s->rbuf) > 0) {
            h->parsed = 0;
            int st = feed(h);
            mw_buf_consume(&s->rbuf, h->parsed);
            h->msg_bytes += h->parsed;
            h->parsed = 0;
            if (st) {
                mw_buf_free(&h->body, NULL);
                return pushverdict(L, h->err_msg, st);
            }
            if (mode == 2) mw_buf_free(&h->body, NULL);
        }
        if (h->msg_done) return body_result(L, h, mode);
        if (mode == 1 && mw_buf_len(&h->body) > 0) return body_result(L, h, mode);
        uint32_t want = EPOLLIN;
        int r = mw_stream_fill(s, 16384, &want);
        if (r == 1) {
            /* a peer that always has bytes waiting never lets this wait: the deadline is
             * checked between reads too (not on a call's first read: it was just set) */
            if (fills++ && mw_sched_expired(t, h->deadline)) {
                mw_buf_free(&h->body, NULL);
                return body_timed_out(L, h);
            }
            continue;
        }
        if (r == 0) {
            /* the body was delimited by the close; over TLS only by the peer's close_notify
             * (a bare FIN may be anyone's cut: as a body cut short under a length) */
            if (h->p.type == HTTP_RESPONSE && llhttp_message_needs_eof(&h->p) && !mw_tls_truncated(s)) {
                llhttp_finish(&h->p);
                h->msg_done = 1;
                continue;
            }
            mw_buf_free(&h->body, NULL);
            return pushverdict(L, h->p.type == HTTP_REQUEST ? "connection closed in the request body"
                                                            : "connection closed in the response body", 0);
        }
        if (r == -3) return mw_stream_pusherr(L, s, errno);
        return mw_sock_wait(L, s, t, MW_ROLE_READ, want, h->deadline, read_body_k, mode);
    }
}

static int read_body_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_http *h = lua_touserdata(L, 1);
    mw_task *t = h->s->rt->current;
    int why = mw_sched_reason(t);
    (void)status;
    if (why == MW_WAKE_TIMEOUT) return body_timed_out(L, h);
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (h->s->closed) return mw_pushfail(L, "closed", "closed");
    return read_body_step(L, h, t, (int)ctx);
}

/* hc:read_body(mode, max, timeout): mode "all" -> body | nil, msg, status;
 * "chunk" -> next piece | nil (end) | nil, msg, status; "discard" -> true | nil, msg, status */
static int hc_read_body(lua_State *L)
{
    static const char *const modes[] = { "all", "chunk", "discard", NULL };
    mw_http *h = checkhc(L);
    int mode = luaL_checkoption(L, 2, NULL, modes);
    lua_Integer max = luaL_optinteger(L, 3, -1);
    double timeout = luaL_optnumber(L, 4, -1);
    if (!h->head_done) return luaL_error(L, "no request head was read");
    if (h->msg_done && mw_buf_len(&h->body) == 0) {
        if (mode == 0) lua_pushliteral(L, "");
        else if (mode == 1) lua_pushnil(L);
        else lua_pushboolean(L, 1);
        return 1;
    }
    /* a socket closed before this read (Server:close after its grace) has nothing more to
     * give: at once, not after the timeout (a closed socket never becomes readable) */
    if (h->s->closed) return mw_pushfail(L, "closed", "closed");
    h->body_max = max < 0 ? UINT64_MAX : (uint64_t)max;
    if (max >= 0 && !(h->p.flags & F_CHUNKED) && (h->p.flags & F_CONTENT_LENGTH) &&
        h->p.content_length > h->body_max - h->body_seen)
        return pushverdict(L, "body too large", 413);
    mw_task *t = mw_sock_claim(L, h->s, MW_ROLE_READ);
    lua_settop(L, 1);
    h->deadline = mw_sched_after(h->s->rt, timeout);
    return read_body_step(L, h, t, mode);
}

/* hc:message_bytes() -> the bytes of the message being read (or last read) taken from the
 * socket so far: its head, and its body as read, with the chunked framing (what wrk counts) */
static int hc_message_bytes(lua_State *L)
{
    mw_http *h = checkhc(L);
    lua_pushinteger(L, (lua_Integer)h->msg_bytes);
    return 1;
}

/* hc:state() -> head_done, msg_done, expect_continue, upgrade, content_length|nil, chunked */
static int hc_state(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    lua_pushboolean(L, h->head_done);
    lua_pushboolean(L, h->msg_done);
    lua_pushboolean(L, h->expect_continue);
    lua_pushboolean(L, h->upgrade);
    if (h->p.flags & F_CONTENT_LENGTH) lua_pushinteger(L, (lua_Integer)(h->head_done && !h->msg_done ? h->p.content_length : 0));
    else lua_pushnil(L);
    lua_pushboolean(L, (h->p.flags & F_CHUNKED) != 0);
    return 6;
}

/* The header fields of a request head that passed llhttp (strict) and strict_head: every
 * line after the request line up to the empty one is "name:value" (every LF preceded by CR,
 * no folding, no empty name). Fills out[0, cap) and returns how many fields there are, or
 * -1 if a line has no colon (not a head read_request kept). */
static int head_spans(const char *head, size_t n, hspan *out, int cap)
{
    const char *end = head + n;
    const char *p = memchr(head, '\n', n);
    int k = 0;
    if (!p) return -1;
    for (p++; p < end; ) {
        const char *lf = memchr(p, '\n', (size_t)(end - p));
        if (!lf || lf == p || lf[-1] != '\r') return -1;
        const char *eol = lf - 1;
        if (eol == p) break;                        /* the empty line: the end of the head */
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (!colon || colon == p) return -1;
        if (k < cap) {
            out[k].noff = (uint32_t)(p - head);
            out[k].nlen = (uint32_t)(colon - p);
            out[k].voff = (uint32_t)(colon + 1 - head);
            out[k].vlen = (uint32_t)(eol - colon - 1);
        }
        k++;
        p = lf + 1;
    }
    return k;
}

/* hc:headers_of(req) -> req's headers table, built from the head read_request left in
 * req[4] (which is then dropped): its lines are found again here, so a request whose
 * handler never looks at a header costs no table, no string per header and no copy of the
 * parser's spans. Names are lower case; repeated fields are joined, and every value is
 * listed in req._multi. */
static int hc_headers_of(lua_State *L)
{
    luaL_checkudata(L, 1, HC_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (lua_rawgeti(L, 2, 4) != LUA_TSTRING) return luaL_error(L, "the request's head is gone");
    size_t headlen;
    const char *head = lua_tolstring(L, 3, &headlen);
    mw_http view;
    memset(&view, 0, sizeof view);
    view.base = head;
    /* the spans: on the C stack, or in a userdata for many headers (so build_headers
     * raising leaks nothing) */
    hspan local[32];
    int n = head_spans(head, headlen, local, 32);
    if (n < 0) return luaL_error(L, "the request's head is damaged");
    view.hdrs = local;
    if (n > 32) {
        view.hdrs = lua_newuserdatauv(L, (size_t)n * sizeof(hspan), 0);
        head_spans(head, headlen, view.hdrs, n);
    }
    view.nhdrs = n;
    build_headers(L, &view, 2);
    /* RFC 9112 §3.2.2: with an absolute-form target, Host is the target's authority */
    size_t ulen, alen;
    const char *auth;
    if (lua_rawgeti(L, 2, 7) == LUA_TSTRING) {
        const char *url = lua_tolstring(L, -1, &ulen);
        if (absolute_form(url, ulen, &auth, &alen)) {
            lua_pushlstring(L, auth, alen);
            lua_setfield(L, -3, "host");
        }
    }
    lua_pop(L, 1);
    if (lua_getiuservalue(L, 1, 3) == LUA_TTABLE) lua_setmetatable(L, -2);  /* case-insensitive */
    else lua_pop(L, 1);
    lua_pushboolean(L, 0);
    lua_rawseti(L, 2, 4);
    return 1;
}

/* hc:socket(), hc:server() -> the socket and the server object the connection was made with */
static int hc_socket(lua_State *L)
{
    luaL_checkudata(L, 1, HC_MT);
    lua_getiuservalue(L, 1, 1);
    return 1;
}

static int hc_server(lua_State *L)
{
    luaL_checkudata(L, 1, HC_MT);
    lua_getiuservalue(L, 1, 4);
    return 1;
}

/* hc:idle() -> whether the connection waits in read_request for the first byte of its next
 * request (a server closing idle keep-alive connections closes these) */
static int hc_idle(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    lua_pushboolean(L, h->idle_wait && h->s && !h->s->closed);
    return 1;
}

/* hc:closing(): the server is shutting down, so the responses still made on this connection
 * close it (res:send's C path reads this instead of the server's `closing` field) */
static int hc_closing(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    h->closing = 1;
    return 0;
}

/* hc:msg_done() -> whether the current message was read to its end */
static int hc_msg_done(lua_State *L)
{
    mw_http *h = mw_checkudata_up(L, 1, 1, HC_MT);
    lua_pushboolean(L, h->msg_done);
    return 1;
}

/* hc:trailers() -> { name = value } (lower-case names) once the body was read, or nil */
static int hc_trailers(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    if (!h->msg_done || mw_buf_len(&h->trailers) == 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_newtable(L);
    const char *p = mw_buf_head(&h->trailers), *end = p + mw_buf_len(&h->trailers);
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) nl = end;
        const char *colon = memchr(p, ':', (size_t)(nl - p));
        if (colon) {
            luaL_Buffer b;
            char *o = luaL_buffinitsize(L, &b, (size_t)(colon - p));
            for (const char *c = p; c < colon; c++) o[c - p] = (char)tolower((unsigned char)*c);
            luaL_pushresultsize(&b, (size_t)(colon - p));
            const char *v = colon + 1, *ve = nl;
            while (v < ve && (*v == ' ' || *v == '\t')) v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            lua_pushlstring(L, v, (size_t)(ve - v));
            lua_rawset(L, -3);
        }
        p = nl + 1;
    }
    return 1;
}

/* hc:release(): frees the parser's buffers (a connection that left HTTP, e.g. a WebSocket) */
static int hc_release(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    free(h->hdrs);
    h->hdrs = NULL;
    h->caphdrs = h->nhdrs = 0;
    mw_buf_free(&h->body, NULL);
    mw_buf_free(&h->trailers, NULL);
    return 0;
}

/* hc:continue_sent(): the 100 Continue went out (or is no longer wanted) */
static int hc_clear_expect(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    h->expect_continue = 0;
    return 0;
}

/* A request body the handler left unread is read and dropped after its response, up to
 * this many bytes in all (server.lua's settle: core.http_drain_max), so that the connection
 * can serve the next request; past it the connection closes. */
#define DRAIN_MAX 65536

/* Whether the connection closes after the response to the request being read because of
 * its body: not read to its end, and either the client still waits for 100 Continue (it
 * was never asked for the body, and may never send it: nothing to drain) or the declared
 * length is over DRAIN_MAX (as read_body's "discard" counts it). Decided before the head
 * goes out, so that the response says Connection: close (RFC 9112 §9.6) rather than a
 * keep-alive the server will not keep; res:send's C path and response.lua's connflags
 * (hc:unread_closes) both ask here. A chunked body's size is not known ahead: its drain may
 * still fail after a keep-alive answer (docs/http.md). */
static int unread_closes(const mw_http *h)
{
    if (!h->head_done || h->msg_done) return 0;
    if (h->expect_continue) return 1;
    if (!(h->p.flags & F_CONTENT_LENGTH) || (h->p.flags & F_CHUNKED)) return 0;
    /* (what was read and what is left, without an overflow: the length is the client's) */
    return h->body_seen >= DRAIN_MAX || h->p.content_length > DRAIN_MAX - h->body_seen;
}

/* hc:unread_closes() -> unread_closes */
static int hc_unread_closes(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    lua_pushboolean(L, unread_closes(h));
    return 1;
}

/* ---- response heads ---------------------------------------------------------------------- */

/* The Date line, formatted at most once a second; and the head's start for the usual
 * answer, "HTTP/1.1 200 OK", Server and Date, for the server name last used (one copy
 * instead of seven pieces). */
typedef struct {
    time_t t;
    char s[40];
    size_t n;
    time_t ok_t;                /* when ok was made (0: never) */
    int ok_noserver;            /* made without a Server line */
    char ok_server[64];         /* else for which server name */
    char ok[160];
    size_t okn;
} datecache;

static const char *reason(int code)
{
    switch (code) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 426: return "Upgrade Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

/* Whether a header value may go on the wire as it is: no CR, LF or NUL. */
static int value_clean(const char *v, size_t n)
{
    if (n <= 32) {      /* the usual short value: one pass (three memchr calls cost more) */
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)v[i];
            if (c <= '\r' && (c == '\r' || c == '\n' || c == '\0')) return 0;
        }
        return 1;
    }
    return !(memchr(v, '\r', n) || memchr(v, '\n', n) || memchr(v, '\0', n));
}

/* RFC 9110 tchar: ALPHA / DIGIT / "!#$%&'*+-.^_`|~" */
static const unsigned char tchar_tab[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1, ['I'] = 1,
    ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1,
    ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1,
    ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1,
    ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

static inline int is_tchar(unsigned char c) { return tchar_tab[c]; }

/* Whether s[0, n) is a field name: one or more tchars. */
static int name_ok(const char *s, size_t n)
{
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (!is_tchar((unsigned char)s[i])) return 0;
    return 1;
}

void mw_http_check_field(lua_State *L, const char *k, size_t kn, const char *v, size_t vn)
{
    if (kn == 0) luaL_error(L, "empty header name");
    if (!name_ok(k, kn)) luaL_error(L, "invalid header name '%s'", k);
    if (!value_clean(v, vn)) luaL_error(L, "invalid value for header '%s' (CR, LF or NUL)", k);
}

void mw_http_check_method(lua_State *L, const char *m, size_t mn)
{
    if (mn == 0) luaL_error(L, "empty method");
    if (!name_ok(m, mn)) luaL_error(L, "invalid method '%s'", m);
}

/* Where a head is built: a luaL_Buffer, or a fixed array (the send fast path), which
 * records an overflow instead of growing. */
typedef struct {
    luaL_Buffer *lb;
    char *p;
    size_t n, cap;
    int overflow;
} sink;

static inline void put(sink *k, const char *s, size_t n)
{
    if (k->lb) {
        luaL_addlstring(k->lb, s, n);
    } else if (k->n + n <= k->cap) {
        memcpy(k->p + k->n, s, n);
        k->n += n;
    } else {
        k->overflow = 1;
    }
}

static inline void puts_(sink *k, const char *s) { put(k, s, strlen(s)); }

/* Appends "Date: ...\r\n", formatting the date at most once a second. */
static void add_date(sink *k, datecache *dc)
{
    time_t now = time(NULL);
    if (now != dc->t) {
        struct tm tm;
        gmtime_r(&now, &tm);
        dc->n = strftime(dc->s, sizeof dc->s, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
        dc->t = now;
    }
    put(k, dc->s, dc->n);
}

/* Appends "name: value\r\n" for nh pairs of the flat array at idx from index first, checking
 * names (tokens) and values (no CR, LF, NUL) unless `checked` says res:header did that as it
 * stored them. Sets bits in *seen: 1 content-length, 2 transfer-encoding, 4 connection,
 * 8 host. */
/* no_length: a response with no Content-Length (bodyless, but for a 304): a handler's is
 * dropped */
static void add_headers(lua_State *L, sink *k, int idx, lua_Integer first, lua_Integer nh, int *seen, int checked,
                        int no_length)
{
    for (lua_Integer i = first; i < first + 2 * nh; i += 2) {
        size_t kn, vn;
        int tk = lua_rawgeti(L, idx, i);
        if (lua_rawgeti(L, idx, i + 1) != LUA_TSTRING || tk != LUA_TSTRING)
            luaL_error(L, "bad header #%d (strings expected)", (int)((i - first) / 2 + 1));
        /* both stay referenced by the table after the pops below */
        const char *key = lua_tolstring(L, -2, &kn);
        const char *v = lua_tolstring(L, -1, &vn);
        if (!checked) mw_http_check_field(L, key, kn, v, vn);
        if (kn == 14 && strncasecmp(key, "content-length", 14) == 0) {
            *seen |= 1;
            if (no_length) {
                lua_pop(L, 2);
                continue;
            }
        } else if (kn == 17 && strncasecmp(key, "transfer-encoding", 17) == 0) *seen |= 2;
        else if (kn == 10 && strncasecmp(key, "connection", 10) == 0) *seen |= 4;
        else if (kn == 4 && strncasecmp(key, "host", 4) == 0) *seen |= 8;
        lua_pop(L, 2);  /* balanced stack use while the luaL_Buffer is open */
        put(k, key, kn);
        put(k, ": ", 2);
        put(k, v, vn);
        put(k, "\r\n", 2);
    }
}

static void add_length(sink *k, lua_Integer length)
{
    char num[32], *e = num + sizeof num, *d = e;
    *--d = '\n';
    *--d = '\r';
    do { *--d = (char)('0' + length % 10); length /= 10; } while (length > 0);
    put(k, "Content-Length: ", 16);
    put(k, d, (size_t)(e - d));
}

/* build_head's flags: 1 close, 2 keep-alive answer for HTTP/1.0, 4 no Content-Length, 8 the
 * answer to a CONNECT; and, not from Lua: the headers were checked as res:header stored them */
#define HF_CONNECT 8
#define HF_LUA 15
#define HF_CHECKED 16

/* Whether a response has no body, and its head no Content-Length or Transfer-Encoding for
 * one (what a HEAD gets is the request's business, not this): 1xx, 204 and 304 (RFC 9110
 * §6.4.1; a 304 may keep the GET's Content-Length), and a 2xx to CONNECT, after which the
 * bytes are the tunnel's (§9.3.6). The one rule for both res:send paths, res:write and
 * HTTP/2's res:send (h2.c's C path; core.http_bodyless in Lua). */
int mw_http_bodyless(lua_Integer status, int connect)
{
    return status < 200 || status == 204 || status == 304 || (connect && status < 300);
}

/* The head's start for 200 from the cache (see datecache), remade when the second or the
 * server name changed; 0 if the name does not fit (the caller builds it piece by piece). */
static int add_ok_start(sink *k, datecache *dc, const char *server)
{
    time_t now = time(NULL);
    const char *sv = server ? server : "";
    if (now != dc->ok_t || dc->ok_noserver != !server || strcmp(sv, dc->ok_server) != 0) {
        size_t sn = strlen(sv);
        if (sn >= sizeof dc->ok_server) return 0;
        sink ok = { NULL, dc->ok, 0, sizeof dc->ok, 0 };
        put(&ok, "HTTP/1.1 200 OK\r\n", 17);
        if (server) {
            put(&ok, "Server: ", 8);
            put(&ok, sv, sn);
            put(&ok, "\r\n", 2);
        }
        add_date(&ok, dc);
        if (ok.overflow) return 0;
        memcpy(dc->ok_server, sv, sn + 1);
        dc->ok_noserver = !server;
        dc->okn = ok.n;
        dc->ok_t = now;
    }
    put(k, dc->ok, dc->okn);
    return 1;
}

/* The response head: status line, Server, Date, the headers (flat array at hidx), then
 * Content-Length / Transfer-Encoding and Connection as length and flags say. */
static int build_head(lua_State *L, sink *k, datecache *dc, lua_Integer status, int hidx, lua_Integer first,
                      lua_Integer nh, lua_Integer length, lua_Integer flags, const char *server)
{
    if (status != 200 || !add_ok_start(k, dc, server)) {
        char line[16];
        memcpy(line, "HTTP/1.1 ", 9);
        line[9] = (char)('0' + status / 100);
        line[10] = (char)('0' + status / 10 % 10);
        line[11] = (char)('0' + status % 10);
        line[12] = ' ';
        put(k, line, 13);
        puts_(k, reason((int)status));
        put(k, "\r\n", 2);
        if (server) {
            put(k, "Server: ", 8);
            puts_(k, server);
            put(k, "\r\n", 2);
        }
        add_date(k, dc);
    }
    int seen = 0;
    int none = mw_http_bodyless(status, (int)(flags & HF_CONNECT));
    add_headers(L, k, hidx, first, nh, &seen, (int)(flags & HF_CHECKED), none && status != 304);
    if (length >= 0 && !(seen & 3) && !none && !(flags & 4)) add_length(k, length);
    else if (length == -1 && !(seen & 2) && !none) puts_(k, "Transfer-Encoding: chunked\r\n");
    if (!(seen & 4)) {
        if (flags & 1) puts_(k, "Connection: close\r\n");
        else if (flags & 2) puts_(k, "Connection: keep-alive\r\n");
    }
    put(k, "\r\n", 2);
    return seen;
}

/* http_head(status, headers, nheaders, length, flags [, server [, first]]) -> head bytes
 * headers: flat array {name1, value1, name2, value2, ...} from index first (default 1), of
 * which 2*nheaders entries count; length: body length (>= 0), -1 chunked, -2 none; flags: bit 1 close, bit 2
 * keep-alive answer for HTTP/1.0, bit 4 omit Content-Length even if length >= 0, bit 8 the
 * answer to a CONNECT (a 2xx then has neither Content-Length nor Transfer-Encoding). */
static int l_http_head(lua_State *L)
{
    datecache *dc = lua_touserdata(L, lua_upvalueindex(1));
    lua_Integer status = luaL_checkinteger(L, 1);
    luaL_argcheck(L, status >= 100 && status <= 999, 1, "status out of range");
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer nh = luaL_checkinteger(L, 3);
    lua_Integer length = luaL_checkinteger(L, 4);
    lua_Integer flags = luaL_optinteger(L, 5, 0) & HF_LUA;
    const char *server = luaL_optstring(L, 6, NULL);
    lua_Integer first = luaL_optinteger(L, 7, 1);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    sink k = { &b, NULL, 0, 0, 0 };
    build_head(L, &k, dc, status, 2, first, nh, length, flags, server);
    luaL_pushresult(&b);
    return 1;
}

/* http_send's work, for it and for the res:send fast path: the head of the response whose
 * headers are in the table at tidx (from index first), then the body. Returns 0 when it all
 * went out (or was gathered), -1 when the head is too big for this path (nothing was sent);
 * else pushes what http_send returns (false, rest [, rest2], or nil, err, code) and returns
 * how many values. */
static int send_core(lua_State *L, datecache *dc, mw_sock *s, int tidx, lua_Integer status, lua_Integer first,
                     lua_Integer nh, const char *body, size_t blen, lua_Integer flags, const char *server,
                     int with_body)
{
    char head[4096];
    sink k = { NULL, head, 0, sizeof head, 0 };
    int seen = build_head(L, &k, dc, status, tidx, first, nh, (lua_Integer)blen, flags, server);
    /* a head too big for this path, or a body under a content-length of the handler's
     * (response.lua's send holds the body to it, then sends through http_head) */
    if (k.overflow || ((seen & 1) && with_body)) return -1;
    size_t total = k.n + (with_body ? blen : 0), sent = 0;
    /* More requests already arrived (pipelined) and this one is small: gather it, to go out
     * with the next ones in one write before the loop polls; the last of them goes out with
     * what was gathered, in one write. Not when the connection will close, nor after a write
     * that waits (it would be overtaken). What the socket does not take now stays gathered. */
    int more = mw_buf_len(&s->rbuf) > 0;
    if ((more || mw_buf_len(&s->obuf) > 0) && !(flags & 1) && !s->waiter[MW_ROLE_WRITE] &&
        mw_buf_len(&s->obuf) + total <= MW_GATHER_MAX &&
        mw_sock_gather(s, head, k.n, body, with_body ? blen : 0) == 0) {
        uint32_t want = EPOLLOUT;
        if (!more && mw_sock_flush(s, &want) < 0) return mw_stream_pusherr(L, s, errno);
        return 0;
    }
    if (!s->waiter[MW_ROLE_WRITE]) {    /* another task writing: it goes first, through write */
        while (sent < total) {
            struct iovec iov[2];
            int cnt = 0;
            if (sent < k.n) {
                iov[cnt].iov_base = head + sent;
                iov[cnt++].iov_len = k.n - sent;
            }
            if (with_body && blen > 0) {
                size_t off = sent > k.n ? sent - k.n : 0;
                iov[cnt].iov_base = (void *)(body + off);
                iov[cnt++].iov_len = blen - off;
            }
            uint32_t want = EPOLLOUT;
            ssize_t n = mw_sock_writev(s, iov, cnt, &want);
            if (n > 0) { sent += (size_t)n; continue; }
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            if (n == 0) break;
            return mw_stream_pusherr(L, s, errno);
        }
        if (sent == total) return 0;
    }
    lua_pushboolean(L, 0);
    int nret = 1;
    if (sent < k.n) {
        lua_pushlstring(L, head + sent, k.n - sent);
        nret++;
    }
    if (with_body && blen > 0) {
        size_t off = sent > k.n ? sent - k.n : 0;
        lua_pushlstring(L, body + off, blen - off);
        nret++;
    }
    return nret;
}

/* http_send(sock, status, headers, nheaders, body, flags, server, with_body [, first]) -> true when
 * the head (built as http_head builds it, with Content-Length #body) and the body (when
 * with_body) went out whole in one write; false, rest [, rest2] when the socket took only
 * part (the caller writes the rest with sock:write); false alone when the head is too big
 * for this path (the caller uses http_head); nil, err, code on a write error. res:send's
 * Lua path. */
static int l_http_send(lua_State *L)
{
    datecache *dc = lua_touserdata(L, lua_upvalueindex(1));
    mw_sock *s = mw_checkudata_up(L, 1, 2, MW_SOCK_MT);
    if (s->closed) luaL_error(L, "attempt to use a closed socket");
    lua_Integer status = luaL_checkinteger(L, 2);
    luaL_argcheck(L, status >= 100 && status <= 999, 2, "status out of range");
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_Integer nh = luaL_checkinteger(L, 4);
    size_t blen;
    const char *body = luaL_checklstring(L, 5, &blen);
    lua_Integer flags = luaL_optinteger(L, 6, 0) & HF_LUA;
    const char *server = luaL_optstring(L, 7, NULL);
    int with_body = lua_toboolean(L, 8);
    lua_Integer first = luaL_optinteger(L, 9, 1);
    int n = send_core(L, dc, s, 3, status, first, nh, body, blen, flags, server, with_body);
    if (n > 0) return n;
    lua_pushboolean(L, n == 0);
    return 1;
}

/* ---- res:send and res:header (response.lua) in C ------------------------------------- */

/* The response's slots (response.lua). */
enum { RS_REQ = 2, RS_NH = 4, RS_FIN = 5, RS_BYTES = 6, RS_STATUS = 7, RS_CLOSE = 8, RS_HBASE = 10 };
/* upvalues of both: 1 the date cache, 2 the Lua implementation (for everything but the
 * common case), 3 write_rest (send: what the socket did not take), the key "sent" */
enum { UP_DC = 1, UP_SLOW, UP_REST, UP_SENT, UP_COUNT = UP_SENT };

/* res:send(body): a string (or nil) body, the head not sent yet, no compression to decide:
 * done here; anything else goes to the Lua implementation. */
static int l_res_send(lua_State *L)
{
    int top0 = lua_gettop(L);
    size_t blen = 0;
    const char *body = "";
    if (top0 < 1 || top0 > 2 || lua_type(L, 1) != LUA_TTABLE) return mw_call_upvalue(L, UP_SLOW, top0);
    int tb = top0 == 2 ? lua_type(L, 2) : LUA_TNIL;
    if (tb == LUA_TSTRING) body = lua_tolstring(L, 2, &blen);
    else if (tb != LUA_TNIL) return mw_call_upvalue(L, UP_SLOW, top0);
    lua_settop(L, 2);
    if (mw_rawget_upvalue(L, 1, UP_SENT) != LUA_TBOOLEAN || lua_toboolean(L, -1)) return mw_call_upvalue(L, UP_SLOW, top0);
    /* the request's connection (its slot 1) knows the rest: the server's settings and what
     * the request said */
    if (lua_rawgeti(L, 1, RS_REQ) != LUA_TTABLE) return mw_call_upvalue(L, UP_SLOW, top0);      /* 4 */
    lua_rawgeti(L, 4, 1);                                                                  /* 5 */
    mw_http *h = hc_of(L, 5);
    if (!h || !h->s || h->has_server_name < 0 || h->gzip_from < 0 || (double)blen >= h->gzip_from)
        return mw_call_upvalue(L, UP_SLOW, top0);
    int isnum;
    lua_rawgeti(L, 1, RS_STATUS);
    lua_Integer status = lua_tointegerx(L, -1, &isnum);
    if (!isnum || status < 100 || status > 999) return mw_call_upvalue(L, UP_SLOW, top0);
    lua_rawgeti(L, 1, RS_NH);
    lua_Integer nh = lua_tointegerx(L, -1, &isnum);
    if (!isnum) return mw_call_upvalue(L, UP_SLOW, top0);
    mw_sock *s = h->s;
    /* closed: by the handler (misuse, raises) or by Server:close after its grace period (a
     * failure): response.lua tells which */
    if (s->closed) return mw_call_upvalue(L, UP_SLOW, top0);
    lua_rawgeti(L, 1, RS_CLOSE);
    lua_Integer flags = 0;
    if (!h->req_keepalive || h->closing || lua_toboolean(L, -1) || unread_closes(h)) {
        flags = 1;
        lua_pushboolean(L, 1);
        lua_rawseti(L, 1, RS_CLOSE);
    } else if (h->req_http10) {
        flags = 2;
    }
    if (h->req_connect) flags |= HF_CONNECT;
    int with_body = !mw_http_bodyless(status, h->req_connect) && !h->req_head;
    datecache *dc = lua_touserdata(L, lua_upvalueindex(UP_DC));
    int base = lua_gettop(L);
    int nret = send_core(L, dc, s, 1, status, RS_HBASE, nh, body, blen, flags | HF_CHECKED,
                         h->has_server_name ? h->server_name : NULL, with_body);
    if (nret < 0) return mw_call_upvalue(L, UP_SLOW, top0);    /* a head too big for this path: nothing sent */
    /* sent (whole, in part, or failed): as response.lua does */
    lua_pushvalue(L, lua_upvalueindex(UP_SENT));
    lua_pushboolean(L, 1);
    lua_rawset(L, 1);
    lua_pushboolean(L, 1);
    lua_rawseti(L, 1, RS_FIN);
    lua_pushinteger(L, with_body ? (lua_Integer)blen : 0);
    lua_rawseti(L, 1, RS_BYTES);
    if (nret == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (lua_isnil(L, base + 1)) {                   /* nil, err, code */
        lua_pushboolean(L, 1);
        lua_rawseti(L, 1, RS_CLOSE);
        return nret;
    }
    /* false, rest [, rest2]: write_rest(self, rest [, rest2]) writes them (and may wait) */
    lua_pushvalue(L, lua_upvalueindex(UP_REST));
    lua_pushvalue(L, 1);
    for (int i = base + 2; i <= base + nret; i++) lua_pushvalue(L, i);
    int callbase = base + nret;
    lua_callk(L, nret, LUA_MULTRET, callbase, mw_results_k);
    return mw_results_k(L, LUA_OK, callbase);
}

/* res:header(name, value): two strings, a token for a name, a value without CR, LF or NUL,
 * the head not sent yet: appended here; anything else goes to the Lua implementation. Both
 * check what they store, so res:send's C path does not check again. */
static int l_res_header(lua_State *L)
{
    int top0 = lua_gettop(L);
    if (top0 != 3 || lua_type(L, 1) != LUA_TTABLE || lua_type(L, 2) != LUA_TSTRING || lua_type(L, 3) != LUA_TSTRING)
        return mw_call_upvalue(L, UP_SLOW, top0);
    size_t kn, vn;
    const char *k = lua_tolstring(L, 2, &kn);
    const char *v = lua_tolstring(L, 3, &vn);
    if (!name_ok(k, kn) || !value_clean(v, vn)) return mw_call_upvalue(L, UP_SLOW, top0);
    /* the framing fields (Content-Length, Transfer-Encoding, Connection): response.lua
     * checks what they say */
    if ((kn == 14 && strncasecmp(k, "content-length", 14) == 0) ||
        (kn == 17 && strncasecmp(k, "transfer-encoding", 17) == 0) ||
        (kn == 10 && strncasecmp(k, "connection", 10) == 0))
        return mw_call_upvalue(L, UP_SLOW, top0);
    if (mw_rawget_upvalue(L, 1, UP_SENT) != LUA_TBOOLEAN || lua_toboolean(L, -1)) return mw_call_upvalue(L, UP_SLOW, top0);
    int isnum;
    lua_rawgeti(L, 1, RS_NH);
    lua_Integer n = lua_tointegerx(L, -1, &isnum);
    if (!isnum || n < 0) return mw_call_upvalue(L, UP_SLOW, top0);
    lua_settop(L, 3);                   /* the value, then the name, straight off the stack */
    lua_rawseti(L, 1, RS_HBASE + 2 * n + 1);
    lua_rawseti(L, 1, RS_HBASE + 2 * n);
    lua_pushinteger(L, n + 1);
    lua_rawseti(L, 1, RS_NH);
    return 1;                           /* self */
}

/* http_response_methods(send_lua, header_lua, write_rest) -> send, header: res:send and
 * res:header with their common case in C (upvalues: see UP_*) */
static int l_http_response_methods(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    for (int m = 0; m < 2; m++) {
        lua_pushvalue(L, lua_upvalueindex(1));   /* the date cache */
        lua_pushvalue(L, m == 0 ? 1 : 2);
        lua_pushvalue(L, 3);
        lua_pushliteral(L, "sent");
        lua_pushcclosure(L, m == 0 ? l_res_send : l_res_header, UP_COUNT);
    }
    return 2;
}

/* http_bodyless(status, connect) -> whether the response has no body (mw_http_bodyless); connect:
 * it answers a CONNECT */
static int l_http_bodyless(lua_State *L)
{
    lua_pushboolean(L, mw_http_bodyless(luaL_checkinteger(L, 1), lua_toboolean(L, 2)));
    return 1;
}

/* http_value_ok(v [, name]) -> whether v is a string that may be a header value (no CR, LF
 * or NUL) and, when a second argument is given, that it is a string too; never raises */
static int l_http_value_ok(lua_State *L)
{
    int ok = lua_type(L, 1) == LUA_TSTRING && (lua_gettop(L) < 2 || lua_type(L, 2) == LUA_TSTRING);
    if (ok) {
        size_t n;
        const char *v = lua_tolstring(L, 1, &n);
        ok = value_clean(v, n);
    }
    lua_pushboolean(L, ok);
    return 1;
}

/* http_request_head(method, target, host, headers, nheaders, length) -> head bytes
 * length: body length (>= 0; 0 adds Content-Length only for methods that carry bodies),
 * -1 chunked, -2 no body. Host is added unless the headers set it. */
static int l_http_request_head(lua_State *L)
{
    size_t mn, tn, hn;
    const char *method = luaL_checklstring(L, 1, &mn);
    const char *target = luaL_checklstring(L, 2, &tn);
    const char *host = luaL_checklstring(L, 3, &hn);
    luaL_checktype(L, 4, LUA_TTABLE);
    lua_Integer nh = luaL_checkinteger(L, 5);
    lua_Integer length = luaL_checkinteger(L, 6);
    mw_http_check_method(L, method, mn);
    luaL_argcheck(L, tn > 0, 2, "empty target");
    for (size_t i = 0; i < tn; i++)
        if ((unsigned char)target[i] <= ' ' || target[i] == 0x7f) luaL_argerror(L, 2, "invalid character in target");
    for (size_t i = 0; i < hn; i++)
        if ((unsigned char)host[i] <= ' ' || host[i] == 0x7f) luaL_argerror(L, 3, "invalid character in host");
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    sink k = { &b, NULL, 0, 0, 0 };
    luaL_addlstring(&b, method, mn);
    luaL_addchar(&b, ' ');
    luaL_addlstring(&b, target, tn);
    luaL_addlstring(&b, " HTTP/1.1\r\n", 11);
    int seen = 0;
    add_headers(L, &k, 4, 1, nh, &seen, 0, 0);
    if (!(seen & 8)) {
        luaL_addlstring(&b, "Host: ", 6);
        luaL_addlstring(&b, host, hn);
        luaL_addlstring(&b, "\r\n", 2);
    }
    int bodied = !(mn == 3 && memcmp(method, "GET", 3) == 0) && !(mn == 4 && memcmp(method, "HEAD", 4) == 0) &&
                 !(mn == 6 && memcmp(method, "DELETE", 6) == 0) && !(mn == 7 && memcmp(method, "OPTIONS", 7) == 0);
    if (length > 0 || (length == 0 && bodied)) {
        if (!(seen & 3)) add_length(&k, length);
    } else if (length == -1 && !(seen & 3)) {
        luaL_addstring(&b, "Transfer-Encoding: chunked\r\n");
    }
    luaL_addlstring(&b, "\r\n", 2);
    luaL_pushresult(&b);
    return 1;
}

/* ---- the connection object ----------------------------------------------------------------- */

static int hc_gc(lua_State *L)
{
    mw_http *h = luaL_checkudata(L, 1, HC_MT);
    free(h->hdrs);
    h->hdrs = NULL;
    h->caphdrs = h->nhdrs = 0;
    mw_buf_free(&h->body, NULL);
    mw_buf_free(&h->trailers, NULL);
    h->s = NULL;
    return 0;
}

static size_t opt_size(lua_State *L, int t, const char *k, size_t dflt)
{
    size_t v = dflt;
    if (lua_getfield(L, t, k) != LUA_TNIL) {
        lua_Integer n = lua_tointeger(L, -1);
        if (n <= 0) luaL_error(L, "bad limit '%s' (positive integer expected)", k);
        v = (size_t)n;
    }
    lua_pop(L, 1);
    return v;
}

/* http_conn(sock, limits, mt [, client [, headers_mt [, server]]]) -> hc: parses requests
 * (server side) or, with client set, responses; read_request(idle, head [, head_request])
 * returns the message table with metatable mt (requests also get `socket`, `_server`, and
 * headers_mt on their headers). The server table gives res:send's C path its name and
 * compression threshold, and read_request its default timeouts. */
static int l_http_conn(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TTABLE);
    int client = lua_toboolean(L, 4);
    lua_settop(L, 6);
    mw_http *h = lua_newuserdatauv(L, sizeof *h, 4);
    memset(h, 0, sizeof *h);
    h->magic = HC_MAGIC;
    luaL_setmetatable(L, HC_MT);
    int hidx = lua_gettop(L);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, hidx, 1);
    lua_pushvalue(L, 3);
    lua_setiuservalue(L, hidx, 2);
    lua_pushvalue(L, 5);               /* the metatable of headers tables (optional) */
    lua_setiuservalue(L, hidx, 3);
    lua_pushvalue(L, 6);               /* the server, as request._server (optional) */
    lua_setiuservalue(L, hidx, 4);
    h->max_line = 8192;
    h->max_head = 16384;
    h->max_headers = 100;
    if (lua_istable(L, 2)) {
        h->max_line = opt_size(L, 2, "request_line", h->max_line);
        h->max_head = opt_size(L, 2, "head", h->max_head);
        h->max_headers = opt_size(L, 2, "headers", h->max_headers);
    }
    h->gzip_from = -1;          /* unknown: res:send takes its Lua path */
    h->idle_s = h->head_s = -1; /* none */
    if (lua_istable(L, 6)) {
        if (lua_getfield(L, 6, "server_name") == LUA_TSTRING) {
            size_t n;
            const char *name = lua_tolstring(L, -1, &n);
            h->has_server_name = n < sizeof h->server_name && strlen(name) == n ? 1 : -1;
            if (h->has_server_name == 1) memcpy(h->server_name, name, n + 1);
        }
        if (lua_getfield(L, 6, "_gzip_from") == LUA_TNUMBER) h->gzip_from = lua_tonumber(L, -1);
        lua_pop(L, 2);
        if (lua_getfield(L, 6, "timeouts") == LUA_TTABLE) {
            if (lua_getfield(L, -1, "idle") == LUA_TNUMBER) h->idle_s = lua_tonumber(L, -1);
            if (lua_getfield(L, -2, "head") == LUA_TNUMBER) h->head_s = lua_tonumber(L, -1);
            lua_pop(L, 2);
        }
        lua_pop(L, 1);
    }
    llhttp_init(&h->p, client ? HTTP_RESPONSE : HTTP_REQUEST, &settings);
    h->s = s;
    h->msg_done = 1;
    return 1;
}

void mw_http_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "read_body", hc_read_body }, { "state", hc_state }, { "clear_expect", hc_clear_expect },
        { "read_lean", hc_read_lean }, { "message_bytes", hc_message_bytes }, { "trailers", hc_trailers }, { "release", hc_release },
        { "idle", hc_idle }, { "closing", hc_closing }, { "socket", hc_socket }, { "server", hc_server }, { "headers_of", hc_headers_of },
        { "unread_closes", hc_unread_closes },
        { NULL, NULL }
    };
    pthread_once(&settings_once, init_settings);
    if (luaL_newmetatable(L, HC_MT)) {
        lua_newtable(L);
        luaL_setfuncs(L, methods, 0);
        for (int i = 0; i < K_COUNT; i++) lua_pushstring(L, key_names[i]);
        lua_pushvalue(L, -1 - K_COUNT - 1);
        for (int i = V_11; i <= V_LAST; i++) lua_pushstring(L, value_names[i - V_11]);
        lua_pushcclosure(L, hc_read_request, V_LAST);
        lua_setfield(L, -2, "read_request");
        lua_pushvalue(L, -2);
        lua_pushcclosure(L, hc_msg_done, 1);
        lua_setfield(L, -2, "msg_done");
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, hc_gc);
        lua_setfield(L, -2, "__gc");
    }
    /* hc:read_request also as a plain function: the server's request loop calls it without
     * looking it up through the userdata's metatable on every request */
    lua_getfield(L, -1, "__index");
    lua_getfield(L, -1, "read_request");
    lua_setfield(L, -4, "http_read_request");
    lua_pop(L, 2);
    lua_pushcfunction(L, l_http_conn);
    lua_setfield(L, -2, "http_conn");
    datecache *dc = lua_newuserdatauv(L, sizeof *dc, 0);
    memset(dc, 0, sizeof *dc);
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, l_http_head, 1);
    lua_setfield(L, -3, "http_head");
    lua_pushvalue(L, -1);
    luaL_getmetatable(L, MW_SOCK_MT);     /* made by the net layer, which opens first */
    lua_pushcclosure(L, l_http_send, 2);
    lua_setfield(L, -3, "http_send");
    lua_pushcclosure(L, l_http_response_methods, 1);   /* upvalue: the date cache */
    lua_setfield(L, -2, "http_response_methods");
    lua_pushcfunction(L, l_http_value_ok);
    lua_setfield(L, -2, "http_value_ok");
    lua_pushcfunction(L, l_http_bodyless);
    lua_setfield(L, -2, "http_bodyless");
    lua_pushcfunction(L, l_http_request_head);
    lua_setfield(L, -2, "http_request_head");
    lua_pushinteger(L, DRAIN_MAX);
    lua_setfield(L, -2, "http_drain_max");
    lua_pushcfunction(L, l_http_count);
    lua_setfield(L, -2, "http_count");
    lua_pushcfunction(L, l_isatty);
    lua_setfield(L, -2, "isatty");
}
