/* h2fields: what the HTTP/2 server (h2.c) and client (h2client.c) share: a packed list of
 * header fields (name \0 value \0, as nghttp2 hands them over one by one), an nv list with
 * an arena for lower-cased names, the connection-specific field names HTTP/2 forbids
 * (RFC 9113 §8.2.2), drawing a session's output into the socket's buffer and a stream's body
 * into DATA frames. Lua-free. */
#ifndef MW_H2FIELDS_H
#define MW_H2FIELDS_H

#include "stream.h"
#include "h2mem.h"

#include <nghttp2/nghttp2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct fields {
    char *p;
    size_t len, cap;
    int n;
} fields;

/* Appends name nl, value vl: 0, or -1 when memory ran out (nothing appended). */
static inline int fields_add(fields *f, const uint8_t *n, size_t nl, const uint8_t *v, size_t vl)
{
    size_t need = f->len + nl + vl + 2;
    if (need > f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 256;
        while (cap < need) cap *= 2;
        /* a request's first 256 bytes come from h2mem's recycled blocks (a malloc and a
         * free per request otherwise); more, by realloc (a block of h2mem's is malloc's) */
        char *p = f->p ? realloc(f->p, cap) : mw_h2mem_alloc(cap);
        if (!p) return -1;
        f->p = p;
        f->cap = cap;
    }
    memcpy(f->p + f->len, n, nl);
    f->p[f->len + nl] = 0;
    memcpy(f->p + f->len + nl + 1, v, vl);
    f->p[f->len + nl + 1 + vl] = 0;
    f->len = need;
    f->n++;
    return 0;
}

static inline void fields_free(fields *f)
{
    if (f->p) mw_h2mem_release(f->p);
    memset(f, 0, sizeof *f);
}

/* Walks a packed list: *pos is the offset (start at 0); returns 0 at the end. */
static inline int fields_next(const fields *f, size_t *pos, const char **n, size_t *nl,
                              const char **v, size_t *vl)
{
    if (*pos >= f->len) return 0;
    *n = f->p + *pos;
    *nl = strlen(*n);
    *v = *n + *nl + 1;
    *vl = strlen(*v);
    *pos += *nl + *vl + 2;
    return 1;
}

/* The first value of `name`, or NULL. */
static inline const char *fields_get(const fields *f, const char *name)
{
    size_t pos = 0, nl, vl;
    const char *n, *v;
    while (fields_next(f, &pos, &n, &nl, &v, &vl))
        if (strcmp(n, name) == 0) return v;
    return NULL;
}

/* The first value of `name` and its length (*vl), or NULL. */
static inline const char *fields_getl(const fields *f, const char *name, size_t *vlen)
{
    size_t pos = 0, nl, vl;
    const char *n, *v;
    while (fields_next(f, &pos, &n, &nl, &v, &vl))
        if (strcmp(n, name) == 0) {
            *vlen = vl;
            return v;
        }
    return NULL;
}

/* Whether a (lower-case) field name is connection-specific: never sent over HTTP/2. */
static inline int h2_conn_specific(const char *n, size_t nl)
{
    switch (nl) {
    case 7: return memcmp(n, "upgrade", 7) == 0;
    case 10: return memcmp(n, "connection", 10) == 0 || memcmp(n, "keep-alive", 10) == 0;
    case 16: return memcmp(n, "proxy-connection", 16) == 0;
    case 17: return memcmp(n, "transfer-encoding", 17) == 0;
    default: return 0;
    }
}

/* An nv array plus an arena for lower-cased names (storage owned by the caller). */
typedef struct nvlist {
    nghttp2_nv *nv;
    int n, cap;
    char *arena;
    size_t used, size;
} nvlist;

/* How nv_add takes a name: as given, lower-cased into the arena, or a string literal in
 * lower case (static storage: nghttp2 keeps the pointer instead of a copy,
 * NGHTTP2_NV_FLAG_NO_COPY_NAME). */
enum { NV_AS_IS = 0, NV_LOWER = 1, NV_STATIC = 2 };

/* Adds name/value (see the enum above for `how`); the strings must outlive the submit that
 * uses the list (a NV_STATIC name, the frame's packing too). Past cap, nothing is added. */
static inline void nv_add(nvlist *l, const char *n, size_t nl, const char *v, size_t vl, int how)
{
    if (l->n >= l->cap) return;
    char *nn = (char *)n;
    if (how == NV_LOWER && l->used + nl <= l->size) {
        nn = l->arena + l->used;
        for (size_t i = 0; i < nl; i++) {
            char ch = n[i];
            nn[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
        }
        l->used += nl;
    }
    l->nv[l->n++] = (nghttp2_nv){ (uint8_t *)nn, (uint8_t *)v, nl, vl,
                                  how == NV_STATIC ? NGHTTP2_NV_FLAG_NO_COPY_NAME : NGHTTP2_NV_FLAG_NONE };
}

/* nghttp2 1.52 never sends a HEADERS frame whose fields exceed a bound it computes first
 * (nghttp2_hd_deflate_bound: 12 bytes, then per field 12 more and its name and value, plus 5
 * for a priority) against max_send_header_block_length, 64 KiB unless set: it drops the frame
 * and tells only on_frame_not_send, which for a response or trailers leaves the stream open
 * with nothing sent. So each head is checked against the same bound before it is submitted,
 * and a head that fails says so to its caller. Trailers: at most H2_MAX_TRAILERS fields. */
#define H2_MAX_SEND_HEAD 65536
#define H2_MAX_TRAILERS 64

static inline size_t h2_nv_bound(const nghttp2_nv *nv, size_t n)
{
    size_t b = 12 + 5;
    for (size_t i = 0; i < n; i++) b += 12 + nv[i].namelen + nv[i].valuelen;
    return b;
}

/* 0 when f's fields may go as trailers, else the message saying why not */
static inline const char *h2_trailers_unfit(const fields *f)
{
    size_t pos = 0, nl, vl, b = 12 + 5, k = 0;
    const char *nm, *v;
    while (fields_next(f, &pos, &nm, &nl, &v, &vl)) {
        b += 12 + nl + vl;
        k++;
    }
    if (k > H2_MAX_TRAILERS) return "too many trailer fields (64 at most)";
    if (b > H2_MAX_SEND_HEAD) return "trailer fields too large for HTTP/2 (64 KiB at most)";
    return NULL;
}

/* Submits the fields of f (up to 64) as trailers on stream id, from a data provider's read
 * callback at the end of the body: 0 when submitted (the caller then sets
 * NGHTTP2_DATA_FLAG_NO_END_STREAM), -1 when there are none or nghttp2 refused them. */
static inline int h2_submit_trailers(nghttp2_session *ss, int32_t id, const fields *f)
{
    if (f->n == 0) return -1;
    nghttp2_nv nv[64];
    size_t pos = 0, nl, vl;
    const char *nm, *v;
    int k = 0;
    while (k < 64 && fields_next(f, &pos, &nm, &nl, &v, &vl)) {
        nv[k] = (nghttp2_nv){ (uint8_t *)nm, (uint8_t *)v, nl, vl, NGHTTP2_NV_FLAG_NONE };
        k++;
    }
    return nghttp2_submit_trailer(ss, id, nv, (size_t)k) == 0 ? 0 : -1;
}

/* Draws what the session has to send into s's output buffer until it holds hwm bytes:
 * 0 when nghttp2 has nothing more (its mem_send said 0), 1 when it stopped at hwm, or a
 * negative nghttp2 error (NGHTTP2_ERR_NOMEM: the buffer could not grow). want_write is
 * asked first: a turn with nothing queued costs no pass of mem_send (it stays true while
 * the frame mem_send returned last awaits its after-send work, so that work is done). */
static inline int h2_drain(nghttp2_session *ss, mw_sock *s, size_t hwm)
{
    if (!nghttp2_session_want_write(ss)) return 0;
    while (mw_buf_len(&s->obuf) < hwm) {
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(ss, &data);
        if (n <= 0) return (int)n;
        if (mw_sock_gather(s, (const char *)data, (size_t)n, NULL, 0) < 0) return NGHTTP2_ERR_NOMEM;
    }
    return 1;
}

/* A data provider's read: up to len bytes of out into buf, then, once out is empty and
 * complete (eof), the end of the stream or the trailers of trout. NGHTTP2_ERR_DEFERRED
 * when out is empty and more is to come. */
static inline ssize_t h2_body_read(nghttp2_session *ss, int32_t id, mw_buf *out, mw_buf_pool *pool, int eof,
                                   const fields *trout, uint8_t *buf, size_t len, uint32_t *flags)
{
    size_t have = mw_buf_len(out);
    if (have == 0 && !eof) return NGHTTP2_ERR_DEFERRED;
    size_t n = have < len ? have : len;
    if (n > 0) {
        memcpy(buf, mw_buf_head(out), n);
        mw_buf_consume(out, n);
    }
    if (mw_buf_len(out) == 0) mw_buf_release(out, pool);
    if (eof && mw_buf_len(out) == 0) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        if (h2_submit_trailers(ss, id, trout) == 0) *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
    }
    return (ssize_t)n;
}

#endif
