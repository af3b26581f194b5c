/* h2client: HTTP/2 client connections on libnghttp2 (H2Client, H2ClientStream), and the
 * bench driver that runs requests over one without a Lua call per request.
 *
 * One C-owned nghttp2 client session per connection. Many tasks share it: there is no
 * reading task of its own (an idle pooled connection is no task, so it keeps no loop
 * alive). A task that needs something from the connection (a response head, body bytes,
 * room to write) drives it while no other task does: it writes what nghttp2 has to send
 * (gathered into the socket's output buffer up to a high-water mark), reads, and feeds
 * nghttp2; the callbacks record into the stream structs and wake the tasks parked on their
 * streams. When the driving task has what it came for, it hands the driving over to one of
 * the parked tasks. nghttp2 callbacks never run Lua. Request bodies go through a data
 * provider from a per-stream buffer (a writer waits while it is above out_hwm); response
 * windows are given back as the caller reads (no automatic WINDOW_UPDATE). */
#define _GNU_SOURCE
#include "h2client.h"
#include "hdr.h"
#include "stream.h"
#include "mwlua.h"
#include "list.h"
#include "http.h"
#include "h2fields.h"
#include "h2mem.h"
#include "h2.h"

#include <errno.h>
#include <nghttp2/nghttp2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HC_MT "moonwire.H2Client"
#define HS_MT "moonwire.H2ClientStream"
#define HB_MT "moonwire.H2Bench"
#define MAX_INTERIM 16       /* interim (1xx) responses taken before the final one (core.http_max_interim:
                              * client.lua's HTTP/1.1 limit too) */
#define MAX_ABANDONED 32     /* requests given up while queued, after which a connection is retired */

typedef struct hconn hconn;
typedef struct hstream hstream;
typedef struct hbench hbench;

struct hstream {
    int32_t id;
    hconn *c;                  /* NULL once the connection is gone */
    unsigned in_session : 1;   /* nghttp2 may still refer to it (queued or open) */
    unsigned lua_owned : 1;    /* an H2ClientStream userdata points here */
    unsigned sent : 1;         /* its HEADERS went out */
    unsigned closed : 1;
    unsigned head_done : 1;    /* the final response head is complete */
    unsigned body_done : 1;    /* END_STREAM received */
    unsigned out_eof : 1;      /* the request body is complete */
    unsigned deferred : 1;     /* the data provider said DEFERRED */
    unsigned bad : 1;          /* the response broke a limit */
    unsigned bad_status : 1;   /* ... its :status was not 100..599 */
    unsigned bad_interim : 1;  /* ... more than MAX_INTERIM interim (1xx) responses */
    unsigned abandoned : 1;    /* given up while its HEADERS waited in nghttp2's queue (abandon) */
    unsigned local_rst : 1;    /* nghttp2 reset it itself: a malformed response (on_frame_send) */
    uint8_t interim;           /* interim responses so far (up to MAX_INTERIM + 1) */
    unsigned bench : 1;        /* a bench request: counted, not kept */
    unsigned rst : 1;          /* an RST_STREAM was submitted (stream_reset) */
    uint32_t close_code;
    int status;
    size_t hbytes;
    size_t unconsumed;         /* DATA taken in for Lua, its window not given back yet */
    fields head, trailers, trout;
    mw_buf in, out;            /* response body not read yet; request body not sent yet */
    mw_task *reader, *writer;  /* tasks parked on this stream */
    int64_t t0;                /* bench: when the request was due */
    int retries;               /* bench: REFUSED_STREAM resubmissions */
    int64_t rbytes;            /* bench: HEADERS, CONTINUATION and DATA received, 9-byte frame
                                * headers included (what "read" counts, as wrk's head and framing) */
    hstream *prev, *next;
};

struct hbench {
    mw_hdr *latency, *second, *ttfb;
    int64_t count, bytes, refused_retries, reconnects, hung, timeouts, read_errors, status_errors;
    int64_t statuses[600];
    int64_t rst[16], goaway[16];   /* by error code (14 and above: 15) */
    int stop;
    hconn *running;                /* connections in conn:bench (a list by bnext) */
    /* the requests refused by a connection going away (when they were due, and the retries
     * they used): the thread's next conn:bench sends them first (malloc'd, freed by __gc) */
    struct requeued { int64_t t0; int retries; } *requeue;
    size_t nrequeue, caprequeue;
};

/* a bench run's parameters (conn:bench's spec), read once per call */
typedef struct bspec {
    int streams;
    int64_t interval, next_send, end, drain_end, timeout;
} bspec;

struct hconn {
    nghttp2_session *session;
    mw_sock *sock;
    mw_rt *rt;
    hstream *streams;
    int fatal;
    char err[160];
    const char *errcode;
    char errcodebuf[24];
    int goaway_recv, goaway_sent;
    int retire;                /* out of the pool: closes once its last request ends */
    int abandoned;             /* requests given up while their HEADERS waited (abandon) */
    uint32_t goaway_err;       /* the error code of a GOAWAY nghttp2 sent, 0: none */
    int32_t goaway_last;
    uint32_t goaway_code;
    size_t hwm, out_hwm;
    uint32_t max_fields, max_header_bytes;
    /* the bench driver */
    hbench *b;
    hconn *bnext;
    mw_task *btask;
    nghttp2_nv *bnv;
    size_t bnvlen;
    char *bstore, *bbody;
    size_t bbodylen;
    int active;
    int64_t answered;          /* bench requests answered in this conn:bench */
    int64_t last_progress;
    int64_t last_use;          /* loop clock: the last request put on it, or bytes from the server */
    bspec sp;
    mw_h2mem mem;              /* the session's allocator: no region, recycled small blocks */
};

/* ---- small helpers ----------------------------------------------------------------------- */

static void stream_free(hstream *st)
{
    fields_free(&st->head);
    fields_free(&st->trailers);
    fields_free(&st->trout);
    free(st->in.data);
    free(st->out.data);
    mw_h2mem_release(st);
}

static void stream_release(hstream *st)
{
    if (st->in_session || st->lua_owned) return;
    if (st->c) MW_LIST_UNLINK(st->c->streams, st, prev, next);
    stream_free(st);
}

/* Submits RST_STREAM for st once. A second one would not be harmless: the first, for a
 * request whose HEADERS still waits in nghttp2's queue (for a stream slot), only cancels the
 * HEADERS; a second would go out as an RST_STREAM on an idle stream, a connection error for
 * the server (RFC 9113 §5.1), and end every other request on the connection. */
static void stream_reset(nghttp2_session *ss, hstream *st, uint32_t code)
{
    if (st->rst) return;
    st->rst = 1;
    nghttp2_submit_rst_stream(ss, NGHTTP2_FLAG_NONE, st->id, code);
}

static void drop_input(hstream *st);

static void wake(mw_task **slot)
{
    if (*slot) mw_sched_wake(*slot, MW_WAKE_READY);
}

static void wake_stream(hstream *st)
{
    wake(&st->reader);
    wake(&st->writer);
}

/* Wakes the task driving the connection (parked on its socket), if any. */
static void poke_driver(hconn *c)
{
    mw_sock *s = c->sock;
    if (s->waiter[MW_ROLE_READ]) mw_sched_wake(s->waiter[MW_ROLE_READ], MW_WAKE_READY);
}

/* Wakes the bench task of c when it waits on c's socket (a task killed meanwhile was
 * detached from the socket: never touched). */
static void wake_btask(hconn *c)
{
    mw_task *t = c->btask;
    if (t && (c->sock->waiter[MW_ROLE_READ] == t || c->sock->waiter[MW_ROLE_WRITE] == t))
        mw_sched_wake(t, MW_WAKE_READY);
}

static void conn_fail(hconn *c, const char *msg, const char *code)
{
    if (c->fatal) return;
    c->fatal = 1;
    if (c->goaway_err && strcmp(code, "closed") == 0) {
        /* nghttp2 ended the connection over the server's protocol error (a PUSH_PROMISE
         * though ENABLE_PUSH is 0, say): the connection's end is that error, not a close */
        snprintf(c->err, sizeof c->err, "protocol error: GOAWAY (%s) sent to the server",
                 nghttp2_http2_strerror(c->goaway_err));
        c->errcode = "http2";
    } else {
        snprintf(c->err, sizeof c->err, "%s", msg);
        c->errcode = code;
    }
    for (hstream *st = c->streams; st; st = st->next) wake_stream(st);
    /* the task driving the connection is parked on the socket, not on its stream: woken
     * too (its io_round sees c->fatal), or a conn:close() from another task would leave
     * it waiting for bytes that never come, up to its deadline */
    mw_sock *s = c->sock;
    if (s->waiter[MW_ROLE_READ]) mw_sched_wake(s->waiter[MW_ROLE_READ], MW_WAKE_READY);
    if (s->waiter[MW_ROLE_WRITE]) mw_sched_wake(s->waiter[MW_ROLE_WRITE], MW_WAKE_READY);
    wake_btask(c);
}

static int code_slot(uint32_t code) { return code < 15 ? (int)code : 15; }

/* Gathers what nghttp2 has to send into the socket's output buffer, up to the high-water
 * mark; past it, the driving task is woken to wait for the socket to drain. */
static void flush_session(hconn *c)
{
    mw_sock *s = c->sock;
    if (c->fatal) return;
    if (s->closed) {
        conn_fail(c, "closed", "closed");
        return;
    }
    int r = h2_drain(c->session, s, c->hwm);
    if (r == NGHTTP2_ERR_NOMEM) conn_fail(c, "not enough memory", "ENOMEM");
    else if (r < 0) conn_fail(c, nghttp2_strerror(r), "http2");
    else if (r == 1 && nghttp2_session_want_write(c->session)) poke_driver(c);
}

/* ---- nghttp2 callbacks (no Lua here) ------------------------------------------------------ */

static void bench_done(hconn *c, hstream *st);

static int on_header(nghttp2_session *ss, const nghttp2_frame *f, const uint8_t *n, size_t nl,
                     const uint8_t *v, size_t vl, uint8_t flags, void *ud)
{
    hconn *c = ud;
    (void)flags;
    hstream *st = nghttp2_session_get_stream_user_data(ss, f->hd.stream_id);
    if (!st || st->bad) return 0;
    if (nl == 7 && memcmp(n, ":status", 7) == 0 && !st->head_done) {
        int status = 0;
        for (size_t i = 0; i < vl && i < 3; i++) status = status * 10 + (v[i] - '0');  /* nghttp2 checked it */
        if (status > 599) {
            /* RFC 9110 §15: 100..599 (nghttp2 takes any three digits from 100; http.c the same) */
            st->bad = st->bad_status = 1;
            stream_reset(ss, st, NGHTTP2_PROTOCOL_ERROR);
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
        st->status = status;
        if (st->bench) return 0;
    }
    if (st->bench) return 0;
    st->hbytes += nl + vl + 32;
    fields *dst = st->head_done ? &st->trailers : &st->head;
    if ((uint32_t)dst->n >= c->max_fields || st->hbytes > c->max_header_bytes) {
        st->bad = 1;
        stream_reset(ss, st, NGHTTP2_ENHANCE_YOUR_CALM);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    if (fields_add(dst, n, nl, v, vl) < 0) return NGHTTP2_ERR_CALLBACK_FAILURE;
    return 0;
}

/* A bench connection's streams (conn:bench's, or conn:attach's for the hooks path) count
 * what they receive, frame headers included: one rule for both paths. */
static int on_begin_frame(nghttp2_session *ss, const nghttp2_frame_hd *hd, void *ud)
{
    hconn *c = ud;
    if (!c->b || !hd->stream_id) return 0;
    if (hd->type != NGHTTP2_HEADERS && hd->type != NGHTTP2_CONTINUATION && hd->type != NGHTTP2_DATA) return 0;
    hstream *st = nghttp2_session_get_stream_user_data(ss, hd->stream_id);
    if (st) st->rbytes += (int64_t)hd->length + 9;
    return 0;
}

static int on_frame_recv(nghttp2_session *ss, const nghttp2_frame *f, void *ud)
{
    hconn *c = ud;
    hstream *st = f->hd.stream_id ? nghttp2_session_get_stream_user_data(ss, f->hd.stream_id) : NULL;
    switch (f->hd.type) {
    case NGHTTP2_HEADERS:
        if (!st) return 0;
        if (!st->head_done) {
            if (st->status >= 100 && st->status < 200) {
                /* an interim response (100 Continue, 103): not the answer; at most 16 of
                 * them (as HTTP/1.1's client: a server sending them forever) */
                fields_free(&st->head);
                st->hbytes = 0;
                st->status = 0;
                if (++st->interim > MAX_INTERIM && !st->bad) {
                    st->bad = st->bad_interim = 1;
                    stream_reset(ss, st, NGHTTP2_PROTOCOL_ERROR);
                    wake(&st->reader);
                }
                return 0;
            }
            st->head_done = 1;
            if (st->bench && c->b) {
                hbench *b = c->b;
                int64_t us = (mw_loop_clock() - st->t0) / 1000;
                mw_hdr_record(b->ttfb, us < 0 ? 0 : (uint64_t)us);
            }
        }
        if (f->hd.flags & NGHTTP2_FLAG_END_STREAM) st->body_done = 1;
        wake(&st->reader);
        return 0;
    case NGHTTP2_DATA:
        if (st && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
            st->body_done = 1;
            wake(&st->reader);
        }
        return 0;
    case NGHTTP2_GOAWAY:
        c->goaway_recv = 1;
        c->goaway_last = f->goaway.last_stream_id;
        c->goaway_code = f->goaway.error_code;
        if (c->b) c->b->goaway[code_slot(f->goaway.error_code)]++;
        /* requests still queued in nghttp2 (waiting for a stream slot) can never go out on
         * this connection now, but nghttp2 only tells us (on_frame_not_send) once a slot
         * frees, which a long download may hold for good: their tasks are woken to see
         * unsent_after_goaway() and go again on a new connection */
        for (hstream *q = c->streams; q; q = q->next)
            if (!q->sent) wake_stream(q);
        return 0;
    case NGHTTP2_RST_STREAM:
        if (c->b) c->b->rst[code_slot(f->rst_stream.error_code)]++;
        return 0;
    default:
        return 0;
    }
}

static int on_data_chunk(nghttp2_session *ss, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *ud)
{
    (void)flags;
    (void)ud;
    hstream *st = nghttp2_session_get_stream_user_data(ss, id);
    if (!st || st->bench || st->bad || !st->lua_owned) {
        /* nobody reads it: the window goes back at once */
        nghttp2_session_consume(ss, id, len);
        return 0;
    }
    size_t avail;
    char *p = mw_buf_reserve(&st->in, NULL, len, &avail);
    if (!p) return NGHTTP2_ERR_CALLBACK_FAILURE;
    memcpy(p, data, len);
    mw_buf_commit(&st->in, len);
    st->unconsumed += len;
    wake(&st->reader);
    return 0;
}

static int on_frame_send(nghttp2_session *ss, const nghttp2_frame *f, void *ud)
{
    hconn *c = ud;
    if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
        hstream *st = nghttp2_session_get_stream_user_data(ss, f->hd.stream_id);
        if (st) st->sent = 1;
    } else if (f->hd.type == NGHTTP2_RST_STREAM) {
        /* one nghttp2 sent by itself (not stream_reset's): the response broke a rule it
         * checks (a content-length the DATA did not match, trailers without END_STREAM) */
        hstream *st = nghttp2_session_get_stream_user_data(ss, f->hd.stream_id);
        if (st && !st->rst) st->local_rst = 1;
    } else if (f->hd.type == NGHTTP2_GOAWAY) {
        /* nghttp2's own GOAWAY (a connection error it found): no new requests here, and
         * its error code is what conn_fail reports when the connection then ends */
        c->goaway_sent = 1;
        if (f->goaway.error_code != NGHTTP2_NO_ERROR && !c->goaway_err) c->goaway_err = f->goaway.error_code;
    }
    return 0;
}

static hstream *find_stream(hconn *c, int32_t id)
{
    for (hstream *st = c->streams; st; st = st->next)
        if (st->id == id) return st;
    return NULL;
}

static void stream_closed(hconn *c, hstream *st, uint32_t code)
{
    st->in_session = 0;
    st->closed = 1;
    st->close_code = code;
    wake_stream(st);
    if (st->bench) {
        bench_done(c, st);
        return;
    }
    stream_release(st);
}

/* A request HEADERS that never went out (GOAWAY received, cancelled while it waited for a
 * stream slot). nghttp2 1.52 opens the stream (with our stream user data) before it checks
 * whether the HEADERS may go, and closes it after this callback, so on_stream_close may
 * follow for the same stream: its user data is cleared first, and the stream is closed
 * here once (whether or not on_stream_close comes, and with whatever code). */
static int on_frame_not_send(nghttp2_session *ss, const nghttp2_frame *f, int err, void *ud)
{
    hconn *c = ud;
    (void)err;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    hstream *st = find_stream(c, f->hd.stream_id);
    if (!st || !st->in_session) return 0;
    nghttp2_session_set_stream_user_data(ss, f->hd.stream_id, NULL);
    stream_closed(c, st, NGHTTP2_REFUSED_STREAM);
    return 0;
}

static int on_stream_close(nghttp2_session *ss, int32_t id, uint32_t code, void *ud)
{
    hconn *c = ud;
    hstream *st = nghttp2_session_get_stream_user_data(ss, id);
    if (!st) return 0;
    nghttp2_session_set_stream_user_data(ss, id, NULL);
    stream_closed(c, st, code);
    return 0;   /* never a fatal error here (CVE-2023-35945's path) */
}

static ssize_t read_body_out(nghttp2_session *ss, int32_t id, uint8_t *buf, size_t len,
                             uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    hstream *st = src->ptr;
    hconn *c = ud;
    ssize_t n = h2_body_read(ss, id, &st->out, NULL, st->out_eof, &st->trout, buf, len, flags);
    if (n == NGHTTP2_ERR_DEFERRED) {
        st->deferred = 1;
        return n;
    }
    if (mw_buf_len(&st->out) < c->out_hwm / 2) {
        if (st->writer) wake(&st->writer);
        else if (!st->bench && !st->out_eof) poke_driver(c);   /* the writer may be driving */
    }
    return n;
}

/* ---- driving the connection -------------------------------------------------------------- */

/* One round of I/O by the running task t, which needs progress on the connection. Returns
 * -1 when something happened (the caller checks its condition again), else the count of
 * results to return (the task parked: on its stream `slot` while another task drives, or
 * on the socket). */
static int io_round(lua_State *L, hconn *c, mw_task *t, mw_task **slot, int64_t deadline,
                    lua_KFunction k, lua_KContext ctx)
{
    mw_sock *s = c->sock;
    if (c->fatal) return -1;
    if ((s->waiter[MW_ROLE_READ] && s->waiter[MW_ROLE_READ] != t) ||
        (s->waiter[MW_ROLE_WRITE] && s->waiter[MW_ROLE_WRITE] != t)) {
        /* another task drives: wait on the stream */
        *slot = t;
        return mw_sched_wait(L, t, deadline, k, ctx);
    }
    flush_session(c);
    if (c->fatal) return -1;
    if (mw_buf_len(&s->obuf) >= c->hwm) {
        uint32_t want = EPOLLOUT;
        int r = mw_sock_flush(s, &want);
        if (r < 0) {
            conn_fail(c, strerror(errno), mw_errname(errno));
            return -1;
        }
        if (mw_buf_len(&s->obuf) >= c->hwm)
            return mw_sock_wait(L, s, t, MW_ROLE_WRITE, want, deadline, k, ctx);
        return -1;
    }
    size_t len = mw_buf_len(&s->rbuf);
    if (len > 0) {
        ssize_t n = nghttp2_session_mem_recv(c->session, (const uint8_t *)mw_buf_head(&s->rbuf), len);
        if (n < 0) {
            flush_session(c);     /* nghttp2's GOAWAY, if it made one */
            conn_fail(c, nghttp2_strerror((int)n), "http2");
            return -1;
        }
        mw_buf_consume(&s->rbuf, (size_t)n);
        s->scan = 0;
        c->last_progress = mw_loop_clock();
        c->last_use = c->rt->loop.now;
        flush_session(c);
        return -1;
    }
    if (s->eof) {
        conn_fail(c, "closed", "closed");
        return -1;
    }
    uint32_t want = EPOLLIN;
    int r = mw_stream_fill(s, 16384, &want);
    if (r == 1 || r == 0) return -1;
    if (r == -3) {
        /* the stream layer's words for it ("tls: reason", "tls" for a TLS failure) */
        mw_stream_pusherr(L, s, errno);
        snprintf(c->errcodebuf, sizeof c->errcodebuf, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "EIO");
        conn_fail(c, lua_tostring(L, -2) ? lua_tostring(L, -2) : "I/O error", c->errcodebuf);
        lua_pop(L, 3);
        return -1;
    }
    if (!nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session)) {
        conn_fail(c, "connection ended (GOAWAY)", "closed");
        return -1;
    }
    return mw_sock_wait(L, s, t, MW_ROLE_READ, want, deadline, k, ctx);
}

static void conn_close(hconn *c);

static int unfinished(const hconn *c)
{
    for (const hstream *st = c->streams; st; st = st->next)
        if (!st->closed && !st->abandoned) return 1;
    return 0;
}

/* A request given up (reset, or collected) while its HEADERS still waits in nghttp2's queue
 * for a stream slot: nghttp2 drops the cancelled HEADERS only once a slot frees, which may be
 * never (a server whose MAX_CONCURRENT_STREAMS is 0, slots held by long streams). Meanwhile
 * it costs a small record, not its body (freed here), and no longer counts as unfinished (the
 * connection may idle out); past MAX_ABANDONED of them the connection is retired: the next
 * requests go on a new one, and this one closes once nothing on it is unfinished. */
static void abandon(hconn *c, hstream *st)
{
    if (st->sent || st->closed || st->abandoned) return;
    st->abandoned = 1;
    mw_buf_free(&st->out, NULL);
    if (++c->abandoned >= MAX_ABANDONED) c->retire = 1;
}

/* The running task stops needing the connection: when nobody drives it any more, one of
 * the tasks parked on a stream takes over. A retired connection whose last request ended
 * closes here (nobody else would: it is out of the pool). */
static void handoff(hconn *c)
{
    mw_sock *s = c->sock;
    if (c->retire && !c->fatal && !unfinished(c)) {
        conn_close(c);
        return;
    }
    if (c->fatal || s->waiter[MW_ROLE_READ] || s->waiter[MW_ROLE_WRITE]) return;
    for (hstream *st = c->streams; st; st = st->next) {
        if (st->reader) { wake(&st->reader); return; }
        if (st->writer) { wake(&st->writer); return; }
    }
}

/* ---- the connection ---------------------------------------------------------------------- */

static hconn *checkconn(lua_State *L)
{
    hconn *c = luaL_checkudata(L, 1, HC_MT);
    if (!c->session) luaL_error(L, "attempt to use a closed HTTP/2 connection");
    return c;
}

static double optnum(lua_State *L, int t, const char *k, double d)
{
    lua_getfield(L, t, k);
    double v = luaL_optnumber(L, -1, d);
    lua_pop(L, 1);
    return v;
}

static void bench_leave(hconn *c);

static void bench_free_spec(hconn *c)
{
    free(c->bnv);
    free(c->bstore);
    free(c->bbody);
    c->bnv = NULL;
    c->bstore = c->bbody = NULL;
    c->bnvlen = c->bbodylen = 0;
}

static void conn_free(hconn *c)
{
    if (!c->session) return;
    hstream *st = c->streams;
    while (st) {
        hstream *nx = st->next;
        st->c = NULL;
        st->in_session = 0;
        st->closed = 1;
        wake_stream(st);
        if (!st->lua_owned) stream_free(st);
        st = nx;
    }
    c->streams = NULL;
    bench_leave(c);
    nghttp2_session_del(c->session);
    c->session = NULL;
    mw_h2mem_free(&c->mem);
    bench_free_spec(c);
}

static int hc_gc(lua_State *L)
{
    conn_free(luaL_checkudata(L, 1, HC_MT));
    return 0;
}

/* core.h2_client(sock, opts) -> H2Client. opts: stream_window (1 MiB), conn_window
 * (16 MiB), hwm (64 KiB of socket output that makes the driver wait for the socket),
 * out_hwm (64 KiB of a request body queued that makes st:write wait), header_fields (200),
 * header_bytes (64 KiB). The preface and SETTINGS (ENABLE_PUSH 0) are queued at once. */
static int l_h2_client(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    if (lua_isnoneornil(L, 2)) lua_newtable(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    hconn *c = lua_newuserdatauv(L, sizeof *c, 2);
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, HC_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    c->sock = s;
    c->rt = s->rt;
    uint32_t stream_window = (uint32_t)optnum(L, 2, "stream_window", 1 << 20);
    uint32_t conn_window = (uint32_t)optnum(L, 2, "conn_window", 16 << 20);
    c->hwm = (size_t)optnum(L, 2, "hwm", 65536);
    c->out_hwm = (size_t)optnum(L, 2, "out_hwm", 65536);
    c->max_fields = (uint32_t)optnum(L, 2, "header_fields", 200);
    c->max_header_bytes = (uint32_t)optnum(L, 2, "header_bytes", 65536);
    if (stream_window > 0x7fffffff) stream_window = 0x7fffffff;
    if (conn_window > 0x7fffffff) conn_window = 0x7fffffff;

    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cbs) != 0) return luaL_error(L, "not enough memory");
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, on_begin_frame);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_session_callbacks_set_on_frame_not_send_callback(cbs, on_frame_not_send);
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cbs);
        return luaL_error(L, "not enough memory");
    }
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* until the server's SETTINGS arrive, one stream at a time: requests queue in nghttp2
     * instead of being refused by a server whose limit is lower than the default 100 */
    nghttp2_option_set_peer_max_concurrent_streams(opt, 1);
    nghttp2_option_set_max_outbound_ack(opt, 1000);
    nghttp2_option_set_max_settings(opt, 32);
    mw_h2mem_init(&c->mem);
    int rv = nghttp2_session_client_new3(&c->session, cbs, c, opt, &c->mem.hooks);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_option_del(opt);
    if (rv != 0) return luaL_error(L, "nghttp2_session_client_new3: %s", nghttp2_strerror(rv));
    nghttp2_settings_entry iv[3] = {
        { NGHTTP2_SETTINGS_ENABLE_PUSH, 0 },
        { NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, stream_window },
        { NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, c->max_header_bytes },
    };
    nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, iv, 3);
    if (conn_window > 65535)
        nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, (int32_t)conn_window);
    c->last_progress = c->last_use = c->rt->loop.now;
    flush_session(c);
    return 1;
}

/* Raises unless the n name/value pairs of the flat list at idx are fields HTTP/1.1 would
 * send too (mw_http_check_field: the same rules and messages); returns the names' length. */
static size_t check_fields(lua_State *L, int idx, int n)
{
    size_t names = 0;
    for (int i = 0; i < n; i++) {
        size_t kl, vl;
        lua_rawgeti(L, idx, 2 * i + 1);
        lua_rawgeti(L, idx, 2 * i + 2);
        const char *k = lua_tolstring(L, -2, &kl), *v = lua_tolstring(L, -1, &vl);
        if (!k || !v) luaL_error(L, "bad header list");
        mw_http_check_field(L, k, kl, v, vl);
        names += kl;
        lua_pop(L, 2);
    }
    return names;
}

/* core.h2_check_fields(flat, n): raises unless every pair is a field that may be sent
 * (request trailers: checked before the request goes out) */
static int l_h2_check_fields(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    check_fields(L, 1, (int)luaL_checkinteger(L, 2));
    return 0;
}

/* Builds the request's nv list (pseudo-headers, then the flat name/value pairs at `fidx`,
 * nh of them: names lower-cased, connection-specific ones and TE other than "trailers"
 * dropped) into a block from `alloc` (a userdata, or malloc for the bench). The strings
 * stay owned by the Lua stack (or are copied by the caller). The method and every field,
 * dropped ones too, are checked first as HTTP/1.1 checks them (nothing is allocated yet). */
static nvlist *build_nv(lua_State *L, int base, int fidx, int nh, int use_malloc)
{
    size_t mn;
    const char *method = luaL_checklstring(L, base, &mn);
    mw_http_check_method(L, method, mn);
    size_t arena = check_fields(L, fidx, nh);
    int cap = nh + 4;
    size_t size = sizeof(nvlist) + (size_t)cap * sizeof(nghttp2_nv) + arena;
    nvlist *l = use_malloc ? malloc(size) : lua_newuserdatauv(L, size, 0);
    if (!l) luaL_error(L, "not enough memory");
    l->nv = (nghttp2_nv *)(l + 1);
    l->n = 0;
    l->cap = cap;
    l->arena = (char *)(l->nv + cap);
    l->used = 0;
    l->size = arena;
    static const char *const pseudo[] = { ":method", ":scheme", ":authority", ":path" };
    for (int i = 0; i < 4; i++) {
        size_t vl;
        const char *v = luaL_checklstring(L, base + i, &vl);
        nv_add(l, pseudo[i], strlen(pseudo[i]), v, vl, NV_STATIC);
    }
    for (int i = 0; i < nh; i++) {
        size_t kl, vl;
        lua_rawgeti(L, fidx, 2 * i + 1);
        lua_rawgeti(L, fidx, 2 * i + 2);
        const char *k = lua_tolstring(L, -2, &kl), *v = lua_tolstring(L, -1, &vl);
        /* the strings stay alive: the flat table holds them */
        lua_pop(L, 2);
        if (!k || !v) {
            if (use_malloc) free(l);
            luaL_error(L, "bad header list");
        }
        char lk[24];
        int skip = 0;
        if (kl < sizeof lk) {
            for (size_t j = 0; j < kl; j++) lk[j] = (char)((k[j] >= 'A' && k[j] <= 'Z') ? k[j] + 32 : k[j]);
            skip = h2_conn_specific(lk, kl) || (kl == 4 && memcmp(lk, "host", 4) == 0) || (kl == 2 && memcmp(lk, "te", 2) == 0 && !(vl == 8 && strncasecmp(v, "trailers", 8) == 0));
        }
        if (!skip) nv_add(l, k, kl, v, vl, NV_LOWER);
    }
    return l;
}

static int conn_fail_push(lua_State *L, hconn *c)
{
    return mw_pushfail(L, c->err[0] ? c->err : "closed", c->errcode ? c->errcode : "closed");
}

static hstream *new_stream(hconn *c)
{
    hstream *st = mw_h2mem_alloc(sizeof *st);
    if (!st) return NULL;
    memset(st, 0, sizeof *st);
    st->c = c;
    st->in_session = 1;
    MW_LIST_PUSH(c->streams, st, prev, next);
    return st;
}

/* conn:request(method, scheme, authority, path, flat, nh [, body [, more]]) -> stream |
 * nil, msg, code. `body` (a string) is queued as the request body; with `more` the body
 * goes on with stream:write (and the request ends with write(..., true)). */
static int hc_request(lua_State *L)
{
    hconn *c = checkconn(L);
    luaL_checktype(L, 6, LUA_TTABLE);
    int nh = (int)luaL_checkinteger(L, 7);
    size_t blen = 0;
    const char *body = luaL_optlstring(L, 8, NULL, &blen);
    int more = lua_toboolean(L, 9);
    if (c->fatal) return conn_fail_push(L, c);
    if (c->goaway_recv || c->goaway_sent) return mw_pushfail(L, "connection is going away", "goaway");
    nvlist *l = build_nv(L, 2, 6, nh, 0);
    int lidx = lua_gettop(L);
    if (h2_nv_bound(l->nv, (size_t)l->n) > H2_MAX_SEND_HEAD)
        return mw_pushfail(L, "request head too large for HTTP/2 (64 KiB at most)", "toolarge");
    hstream **ud = lua_newuserdatauv(L, sizeof *ud, 1);
    *ud = NULL;
    luaL_setmetatable(L, HS_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    hstream *st = new_stream(c);
    if (!st) return luaL_error(L, "not enough memory");
    if (body && blen) {
        size_t avail;
        char *p = mw_buf_reserve(&st->out, NULL, blen, &avail);
        if (!p) {
            st->in_session = 0;
            stream_release(st);
            return luaL_error(L, "not enough memory");
        }
        memcpy(p, body, blen);
        mw_buf_commit(&st->out, blen);
    }
    st->out_eof = more ? 0 : 1;
    nghttp2_data_provider prd;
    prd.source.ptr = st;
    prd.read_callback = read_body_out;
    int32_t id = nghttp2_submit_request(c->session, NULL, l->nv, (size_t)l->n,
                                        (st->out_eof && mw_buf_len(&st->out) == 0) ? NULL : &prd, st);
    if (id < 0) {
        st->in_session = 0;
        stream_release(st);
        return mw_pushfail(L, nghttp2_strerror(id), id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE ? "goaway" : "http2");
    }
    st->id = id;
    st->lua_owned = 1;
    *ud = st;
    c->last_use = c->rt->loop.now;
    flush_session(c);
    lua_remove(L, lidx);
    return 1;
}

/* conn:usable() -> whether new requests may go on this connection */
static int hc_usable(lua_State *L)
{
    hconn *c = luaL_checkudata(L, 1, HC_MT);
    lua_pushboolean(L, c->session && !c->fatal && !c->retire && !c->goaway_recv && !c->goaway_sent &&
                           !c->sock->closed && nghttp2_session_check_request_allowed(c->session));
    return 1;
}

/* conn:streams() -> requests not finished (queued or open), the peer's
 * MAX_CONCURRENT_STREAMS */
static int hc_streams(lua_State *L)
{
    hconn *c = luaL_checkudata(L, 1, HC_MT);
    int n = 0;
    for (hstream *st = c->streams; st; st = st->next) if (!st->closed && !st->abandoned) n++;
    lua_pushinteger(L, n);
    lua_pushinteger(L, c->session ? (lua_Integer)nghttp2_session_get_remote_settings(c->session,
                                                  NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS) : 0);
    return 2;
}

/* conn:idle() -> seconds since the connection was last used (a request put on it, bytes
 * from the server), 0 while a request on it is unfinished: the pool's idle_timeout */
static int hc_idle(lua_State *L)
{
    hconn *c = luaL_checkudata(L, 1, HC_MT);
    if (unfinished(c)) lua_pushnumber(L, 0);
    else lua_pushnumber(L, (double)(c->rt->loop.now - c->last_use) / 1e9);
    return 1;
}

/* conn:poll() -> usable: processes what the socket holds now, without waiting (a pooled
 * connection's GOAWAY or close is seen before a request is put on it) */
static int hc_poll(lua_State *L)
{
    hconn *c = checkconn(L);
    mw_sock *s = c->sock;
    if (!c->fatal && !s->waiter[MW_ROLE_READ] && !s->waiter[MW_ROLE_WRITE]) {
        for (int i = 0; i < 16 && !c->fatal; i++) {
            size_t len = mw_buf_len(&s->rbuf);
            if (len > 0) {
                ssize_t n = nghttp2_session_mem_recv(c->session, (const uint8_t *)mw_buf_head(&s->rbuf), len);
                if (n < 0) {
                    conn_fail(c, nghttp2_strerror((int)n), "http2");
                    break;
                }
                mw_buf_consume(&s->rbuf, (size_t)n);
                s->scan = 0;
                continue;
            }
            if (s->eof) {
                conn_fail(c, "closed", "closed");
                break;
            }
            uint32_t want = EPOLLIN;
            int r = mw_stream_fill(s, 16384, &want);
            if (r == -1) break;
            if (r == -3) conn_fail(c, strerror(errno), mw_errname(errno));
        }
        flush_session(c);
    }
    return hc_usable(L);
}

/* conn:info() -> { goaway = code name | nil, last_stream_id, max_streams, error } */
static int hc_info(lua_State *L)
{
    hconn *c = luaL_checkudata(L, 1, HC_MT);
    lua_createtable(L, 0, 4);
    if (c->goaway_recv) {
        lua_pushstring(L, nghttp2_http2_strerror(c->goaway_code));
        lua_setfield(L, -2, "goaway");
        lua_pushinteger(L, c->goaway_last);
        lua_setfield(L, -2, "last_stream_id");
    }
    if (c->session) {
        lua_pushinteger(L, nghttp2_session_get_remote_settings(c->session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS));
        lua_setfield(L, -2, "max_streams");
    }
    if (c->fatal) {
        lua_pushstring(L, c->err);
        lua_setfield(L, -2, "error");
    }
    return 1;
}

/* A GOAWAY (NO_ERROR) when the connection is still good, then the socket closes; every
 * stream still waiting fails with "closed". */
static void conn_close(hconn *c)
{
    if (!c->fatal && !c->goaway_sent && !c->sock->closed) {
        c->goaway_sent = 1;
        nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, NULL, 0);
        flush_session(c);
    }
    conn_fail(c, "closed", "closed");
    /* the descriptor goes now (the GOAWAY gets a last try at going out), not when the
     * handle is collected: a closed connection held by a response or a pool entry would
     * keep its fd (in CLOSE_WAIT once the server answers the GOAWAY) until the next GC */
    if (!c->sock->closed) mw_sock_close(c->sock, 1);
}

/* conn:close(): see conn_close */
static int hc_close(lua_State *L)
{
    hconn *c = luaL_checkudata(L, 1, HC_MT);
    if (c->session) conn_close(c);
    return 0;
}

/* conn:retire(): the pool let go of the connection (a GOAWAY, a close seen, idle too
 * long): it closes once its last request ends, now when none is unfinished, instead of
 * keeping its descriptor until it is collected */
static int hc_retire(lua_State *L)
{
    hconn *c = luaL_checkudata(L, 1, HC_MT);
    if (!c->session) return 0;
    c->retire = 1;
    if (c->fatal || !unfinished(c)) conn_close(c);   /* (a failed one's streams end no more) */
    return 0;
}

/* ---- streams ----------------------------------------------------------------------------- */

static hstream *checkstream(lua_State *L)
{
    hstream **ud = luaL_checkudata(L, 1, HS_MT);
    if (!*ud) luaL_error(L, "attempt to use a finished HTTP/2 stream");
    return *ud;
}

static int hs_gc(lua_State *L)
{
    hstream **ud = luaL_checkudata(L, 1, HS_MT);
    hstream *st = *ud;
    if (!st) return 0;
    *ud = NULL;
    st->reader = st->writer = NULL;
    hconn *c = st->c;
    if (!c) {
        stream_free(st);
        return 0;
    }
    if (!st->closed && c->session && !c->fatal) {
        /* dropped before the end: the server stops sending it (still ours while nghttp2
         * runs: flushing may close the stream) */
        stream_reset(c->session, st, NGHTTP2_CANCEL);
        flush_session(c);
        abandon(c, st);
    }
    drop_input(st);
    st->lua_owned = 0;
    stream_release(st);
    return 0;
}

/* A request whose HEADERS still waits in nghttp2's queue after the server's GOAWAY: it
 * will never be sent on this connection (nghttp2 refuses to start streams past a GOAWAY),
 * so its task fails it as "refused" at once instead of waiting for a stream slot. */
static int unsent_after_goaway(const hstream *st)
{
    return !st->sent && !st->closed && st->c && st->c->goaway_recv;
}

/* Pushes nil, msg, code for a stream that cannot go on. Refused streams (REFUSED_STREAM,
 * above a GOAWAY's last stream id, never sent) say "refused": safe to retry elsewhere. */
static int stream_fail(lua_State *L, hstream *st)
{
    hconn *c = st->c;
    if (st->closed) {
        int refused = !st->head_done &&
                      (st->close_code == NGHTTP2_REFUSED_STREAM || !st->sent ||
                       (c && c->goaway_recv && st->id > c->goaway_last));
        if (refused) return mw_pushfail(L, "stream refused by the server", "refused");
        if (st->bad)
            return mw_pushfail(L, st->bad_status    ? "bad status code in the response (not 100..599)"
                                  : st->bad_interim ? "too many interim (1xx) responses"
                                                    : "response header list too large", "http");
        if (st->local_rst)
            return mw_pushfail(L, "malformed response (its content-length, trailers or fields broke HTTP/2's rules)",
                               "http");
        char msg[96];
        snprintf(msg, sizeof msg, "stream reset (%s)", nghttp2_http2_strerror(st->close_code));
        return mw_pushfail(L, msg, "reset");
    }
    if (unsent_after_goaway(st)) return mw_pushfail(L, "request not sent: the server sent GOAWAY", "refused");
    /* the connection failed (closed, reset, no GOAWAY) before this request's HEADERS went
     * out (it waited for a stream slot): the server never saw it, so it may go again */
    if (!st->sent && !st->head_done) return mw_pushfail(L, "request not sent: the connection ended", "refused");
    if (!c || !c->session) return mw_pushfail(L, "closed", "closed");
    return conn_fail_push(L, c);
}

static void unwait_reader(mw_task *t)
{
    hstream *st = t->wait_obj;
    if (st->reader == t) st->reader = NULL;
}

static void unwait_writer(mw_task *t)
{
    hstream *st = t->wait_obj;
    if (st->writer == t) st->writer = NULL;
}

/* Waits for progress on st's connection (see io_round); `reading` picks the slot. The wait
 * record names st only while the task waits: a round that made progress instead (-1) takes
 * it back, or a later wait of another kind (a sleep) would run unwait_reader on a stream
 * that may be freed by then. */
static int stream_round(lua_State *L, hstream *st, mw_task *t, int reading, int64_t deadline,
                        lua_KFunction k, lua_KContext ctx, int *rounds)
{
    if (*rounds > 0) {
        /* the last round did not wait (bytes were there): the deadline holds between reads
         * too, as HTTP/1.1's (a server that always has bytes waiting, an endless 103 or empty
         * DATA, must not outlast it), and now and then the other tasks run */
        if (mw_sched_expired(t, deadline)) {
            handoff(st->c);
            return mw_sched_pushwake(L, MW_WAKE_TIMEOUT);
        }
        if (*rounds >= MW_STREAK_MAX) return mw_sched_requeue(L, t, k, ctx);
    }
    t->wait_obj = st;
    t->unwait = reading ? unwait_reader : unwait_writer;
    int r = io_round(L, st->c, t, reading ? &st->reader : &st->writer, deadline, k, ctx);
    if (r < 0 && t->wait_obj == st) {
        t->wait_obj = NULL;
        t->unwait = NULL;
    }
    if (r < 0) ++*rounds;
    return r;
}

/* Pushes a headers table (lower-case names; repeated fields joined with ", ", every
 * value of those in a second table `multi`) from a packed list; returns 1 or 2 values. */
static int push_fields(lua_State *L, const fields *f)
{
    lua_createtable(L, 0, f->n);
    int hidx = lua_gettop(L);
    int midx = 0;
    size_t pos = 0, nl, vl;
    const char *n, *v;
    while (fields_next(f, &pos, &n, &nl, &v, &vl)) {
        if (n[0] == ':') continue;
        lua_pushlstring(L, n, nl);
        lua_pushvalue(L, -1);
        if (lua_rawget(L, hidx) == LUA_TNIL) {
            lua_pop(L, 1);
            lua_pushlstring(L, v, vl);
            lua_rawset(L, hidx);
            continue;
        }
        /* repeated: every value in _multi[name] (as the server's requests keep them), and
         * the values joined in headers[name] */
        if (!midx) {
            lua_newtable(L);
            lua_insert(L, hidx + 1);
            midx = hidx + 1;
        }
        int kidx = lua_gettop(L) - 1, oldidx = lua_gettop(L);
        mw_http_add_multi(L, midx, kidx, oldidx, v, vl);
        /* headers[name] = old .. ", " .. v */
        lua_pushvalue(L, kidx);
        lua_pushvalue(L, oldidx);
        lua_pushliteral(L, ", ");
        lua_pushlstring(L, v, vl);
        lua_concat(L, 3);
        lua_rawset(L, hidx);
        lua_settop(L, kidx - 1);
    }
    if (!midx) return 1;
    lua_getfield(L, midx, "_multi");
    lua_replace(L, midx);
    return 2;
}

static int head_k(lua_State *L, int status, lua_KContext ctx);

static int head_step(lua_State *L, hstream *st, mw_task *t, int64_t deadline)
{
    int rounds = 0;
    for (;;) {
        hconn *c = st->c;
        if (st->head_done && !st->bad) {
            handoff(c);
            lua_pushinteger(L, st->status);
            int n = push_fields(L, &st->head);
            if (n == 1) lua_pushnil(L);
            fields_free(&st->head);
            st->hbytes = 0;
            return 3;
        }
        if (st->closed || !c || !c->session || c->fatal || unsent_after_goaway(st)) {
            if (c) handoff(c);
            return stream_fail(L, st);
        }
        int r = stream_round(L, st, t, 1, deadline, head_k, (lua_KContext)deadline, &rounds);
        if (r >= 0) return r;
    }
}

static int resume_common(lua_State *L, hstream **stp)
{
    hstream **ud = lua_touserdata(L, 1);
    *stp = ud ? *ud : NULL;
    if (!*stp) return mw_pushfail(L, "closed", "closed");
    hstream *st = *stp;
    mw_task *t = st->c ? st->c->rt->current : NULL;
    if (!t) return mw_pushfail(L, "closed", "closed");
    int why = mw_sched_reason(t);
    if (why == MW_WAKE_TIMEOUT || (why != MW_WAKE_READY && why != MW_WAKE_NONE)) {
        if (st->c) handoff(st->c);
        return mw_sched_pushwake(L, why);
    }
    return -1;
}

static int head_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    hstream *st;
    int r = resume_common(L, &st);
    if (r >= 0) return r;
    return head_step(L, st, st->c->rt->current, (int64_t)ctx);
}

/* stream:head([timeout]) -> status, headers, multi | nil, msg, code: waits for the final
 * response head (interim 1xx ones are skipped). code "refused": the server did not
 * process the request (retry it); "reset": the stream was reset. */
static int hs_head(lua_State *L)
{
    hstream *st = checkstream(L);
    if (!st->c) return stream_fail(L, st);
    mw_task *t = mw_sched_self(L, st->c->rt);
    int64_t d = mw_sched_deadline(L, st->c->rt, 2, -1);
    return head_step(L, st, t, d);
}

/* Gives n bytes of window back to the peer. */
static void consumed(hstream *st, size_t n)
{
    hconn *c = st->c;
    if (n > st->unconsumed) n = st->unconsumed;    /* each byte's window goes back once */
    st->unconsumed -= n;
    if (!c || !c->session || n == 0 || c->fatal) return;
    if (st->in_session) nghttp2_session_consume(c->session, st->id, n);
    else nghttp2_session_consume_connection(c->session, n);    /* closed: the connection's */
    flush_session(c);
}

/* What Lua will never read of st: dropped, its window given back (to the connection alone
 * once the stream is closed: else a response closed or collected unread would keep its
 * bytes of the connection window for good). */
static void drop_input(hstream *st)
{
    mw_buf_free(&st->in, NULL);
    consumed(st, st->unconsumed);
}

static int read_all_k(lua_State *L, int status, lua_KContext ctx);
static int read_chunk_k(lua_State *L, int status, lua_KContext ctx);

/* modes: 0 all (up to max), 1 chunk */
static int read_step(lua_State *L, hstream *st, mw_task *t, int mode, int64_t deadline)
{
    lua_Integer max = luaL_optinteger(L, 3, -1);
    int rounds = 0;
    for (;;) {
        hconn *c = st->c;
        size_t have = mw_buf_len(&st->in);
        if (mode == 1 && have > 0) {
            if (c) handoff(c);
            lua_pushlstring(L, mw_buf_head(&st->in), have);
            mw_buf_consume(&st->in, have);
            mw_buf_release(&st->in, NULL);
            consumed(st, have);
            return 1;
        }
        if (mode == 0 && max >= 0 && (int64_t)have > max) {
            if (c) handoff(c);
            return mw_pushfail(L, "response body too large", "toolarge");
        }
        if (st->body_done) {
            if (c) handoff(c);
            if (mode == 0) {
                lua_pushlstring(L, have ? mw_buf_head(&st->in) : "", have);
                mw_buf_consume(&st->in, have);
                mw_buf_release(&st->in, NULL);
                consumed(st, have);
                return 1;
            }
            lua_pushnil(L);
            return 1;
        }
        if (st->closed || !c || !c->session || c->fatal) {
            if (c) handoff(c);
            return stream_fail(L, st);
        }
        if (mode == 0 && have > 0) {
            /* a whole body is read at once: its window goes back as it arrives (a body
             * larger than the stream window could never complete otherwise) */
            consumed(st, st->unconsumed);
        }
        int r = stream_round(L, st, t, 1, deadline, mode ? read_chunk_k : read_all_k, (lua_KContext)deadline,
                             &rounds);
        if (r >= 0) return r;
    }
}

static int read_k(lua_State *L, lua_KContext ctx, int mode)
{
    hstream *st;
    int r = resume_common(L, &st);
    if (r >= 0) return r;
    return read_step(L, st, st->c->rt->current, mode, (int64_t)ctx);
}

static int read_all_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    return read_k(L, ctx, 0);
}

static int read_chunk_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    return read_k(L, ctx, 1);
}

/* stream:read(mode, max, timeout): "all" -> the whole body (at most max bytes) | nil, msg,
 * code; "chunk" -> the next piece, nil at the end | nil, msg, code. Reading gives the
 * window back: a response nobody reads holds at most one stream window. */
static int hs_read(lua_State *L)
{
    static const char *const modes[] = { "all", "chunk", NULL };
    hstream *st = checkstream(L);
    int mode = luaL_checkoption(L, 2, NULL, modes);
    if (!st->c) return stream_fail(L, st);
    mw_rt *rt = st->c->rt;
    mw_task *t = mw_sched_self(L, rt);
    if (st->reader && st->reader != t) return luaL_error(L, "stream already has a reading task");
    return read_step(L, st, t, mode, mw_sched_deadline(L, rt, 4, -1));
}

static int write_k(lua_State *L, int status, lua_KContext ctx);

static int write_step(lua_State *L, hstream *st, mw_task *t, int64_t deadline)
{
    int rounds = 0;
    for (;;) {
        hconn *c = st->c;
        if (st->closed || !c || !c->session || c->fatal || unsent_after_goaway(st)) {
            /* a response that ended the stream early (say, a 413) is not a write error
             * here: the caller finds it in the head */
            if (c) handoff(c);
            if (st->closed && st->head_done) {
                lua_pushboolean(L, 1);
                return 1;
            }
            return stream_fail(L, st);
        }
        if (mw_buf_len(&st->out) < c->out_hwm) {
            handoff(c);
            lua_pushboolean(L, 1);
            return 1;
        }
        int r = stream_round(L, st, t, 0, deadline, write_k, (lua_KContext)deadline, &rounds);
        if (r >= 0) return r;
    }
}

static int write_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    hstream *st;
    int r = resume_common(L, &st);
    if (r >= 0) return r;
    return write_step(L, st, st->c->rt->current, (int64_t)ctx);
}

/* stream:write(data [, eof [, timeout]]) -> true | nil, msg, code: queues request body
 * bytes; waits while more than out_hwm of them are not sent yet (the server's window is
 * shut: this stream stalls, never the connection). */
static int hs_write(lua_State *L)
{
    hstream *st = checkstream(L);
    size_t len;
    const char *p = luaL_checklstring(L, 2, &len);
    int eof = lua_toboolean(L, 3);
    if (st->out_eof) return luaL_error(L, "request body already finished");
    hconn *c = st->c;
    if (st->closed || !c || !c->session || c->fatal) {
        if (st->closed && st->head_done) {
            lua_pushboolean(L, 1);
            return 1;
        }
        return stream_fail(L, st);
    }
    if (len) {
        size_t avail;
        char *w = mw_buf_reserve(&st->out, NULL, len, &avail);
        if (!w) return luaL_error(L, "not enough memory");
        memcpy(w, p, len);
        mw_buf_commit(&st->out, len);
    }
    if (eof) st->out_eof = 1;
    if (st->deferred) {
        st->deferred = 0;
        nghttp2_session_resume_data(c->session, st->id);
    }
    flush_session(c);
    mw_task *t = mw_sched_self(L, c->rt);
    int64_t d = mw_sched_deadline(L, c->rt, 4, -1);
    return write_step(L, st, t, d);
}

/* stream:set_trailers(flat, n) -> true | nil, err, "toolarge": trailer fields sent after
 * the request body (call it before the write that ends the body) */
static int hs_set_trailers(lua_State *L)
{
    hstream *st = checkstream(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    int n = (int)luaL_checkinteger(L, 3);
    if (st->out_eof) return luaL_error(L, "request body already finished");
    return mw_h2_set_trailers(L, 2, n, &st->trout);
}

/* stream:trailers() -> the response's trailer fields once the body ended, or nil */
static int hs_trailers(lua_State *L)
{
    hstream *st = checkstream(L);
    if (!st->body_done || st->trailers.n == 0) {
        lua_pushnil(L);
        return 1;
    }
    push_fields(L, &st->trailers);
    lua_settop(L, 2);
    return 1;
}

/* stream:state() -> body_done (everything received), closed, id, sent (its HEADERS went out) */
static int hs_state(lua_State *L)
{
    hstream *st = checkstream(L);
    lua_pushboolean(L, st->body_done && mw_buf_len(&st->in) == 0);
    lua_pushboolean(L, st->closed);
    lua_pushinteger(L, st->id);
    lua_pushboolean(L, st->sent);
    return 4;
}

/* stream:reset([code]): RST_STREAM (default CANCEL); the window of what it holds comes
 * back to the connection */
static int hs_reset(lua_State *L)
{
    hstream *st = checkstream(L);
    uint32_t code = (uint32_t)luaL_optinteger(L, 2, NGHTTP2_CANCEL);
    hconn *c = st->c;
    if (c && c->session && !c->fatal && !st->closed) {
        stream_reset(c->session, st, code);
        flush_session(c);
        abandon(c, st);
    }
    drop_input(st);
    if (c && c->session) handoff(c);    /* a retired connection's last request may end here */
    return 0;
}

/* ---- the bench driver -------------------------------------------------------------------- */

static hbench *checkbench(lua_State *L, int idx) { return luaL_checkudata(L, idx, HB_MT); }

/* core.h2_bench(latency, second, ttfb) -> H2Bench: the counters of one bench thread's
 * HTTP/2 connections, recording into the three histograms (microseconds). */
static int l_h2_bench(lua_State *L)
{
    mw_hdr *lat = mw_hdr_check(L, 1), *sec = mw_hdr_check(L, 2), *tt = mw_hdr_check(L, 3);
    hbench *b = lua_newuserdatauv(L, sizeof *b, 3);
    memset(b, 0, sizeof *b);
    b->latency = lat;
    b->second = sec;
    b->ttfb = tt;
    for (int i = 1; i <= 3; i++) {
        lua_pushvalue(L, i);
        lua_setiuservalue(L, -2, i);
    }
    luaL_setmetatable(L, HB_MT);
    return 1;
}

static int hb_gc(lua_State *L)
{
    hbench *b = checkbench(L, 1);
    free(b->requeue);
    b->requeue = NULL;
    b->nrequeue = b->caprequeue = 0;
    return 0;
}

/* b:stop(): the connections stop sending and finish what is in flight */
static int hb_stop(lua_State *L)
{
    hbench *b = checkbench(L, 1);
    b->stop = 1;
    for (hconn *c = b->running; c; c = c->bnext) wake_btask(c);
    return 0;
}

static int hb_count(lua_State *L)
{
    hbench *b = checkbench(L, 1);
    lua_pushinteger(L, b->count);
    lua_pushinteger(L, b->timeouts + b->read_errors + b->status_errors);
    return 2;
}

static void push_codes(lua_State *L, const int64_t *v, const char *name)
{
    lua_newtable(L);
    for (int i = 0; i < 16; i++) {
        if (!v[i]) continue;
        lua_pushinteger(L, v[i]);
        lua_setfield(L, -2, i < 15 ? nghttp2_http2_strerror((uint32_t)i) : "OTHER");
    }
    lua_setfield(L, -2, name);
}

/* b:stats() -> { count, bytes, statuses = {[code] = n}, status_errors, timeouts,
 * read_errors, hung, refused_retries, reconnects, rst = {CODE = n}, goaway = {CODE = n} } */
static int hb_stats(lua_State *L)
{
    hbench *b = checkbench(L, 1);
    lua_newtable(L);
#define F(k) lua_pushinteger(L, b->k); lua_setfield(L, -2, #k)
    F(count); F(bytes); F(status_errors); F(timeouts); F(read_errors); F(refused_retries);
    F(reconnects);
#undef F
    /* refused requests the run ended before sending again: due, never answered */
    lua_pushinteger(L, b->hung + (lua_Integer)b->nrequeue);
    lua_setfield(L, -2, "hung");
    lua_newtable(L);
    for (int i = 0; i < 600; i++) {
        if (!b->statuses[i]) continue;
        lua_pushinteger(L, b->statuses[i]);
        lua_rawseti(L, -2, i);
    }
    lua_setfield(L, -2, "statuses");
    push_codes(L, b->rst, "rst");
    push_codes(L, b->goaway, "goaway");
    return 1;
}

/* b:add(field, n): counts from the Lua side (reconnects, the hooks path's figures) */
static int hb_add(lua_State *L)
{
    hbench *b = checkbench(L, 1);
    const char *k = luaL_checkstring(L, 2);
    lua_Integer n = luaL_optinteger(L, 3, 1);
    if (strcmp(k, "reconnects") == 0) b->reconnects += n;
    else if (strcmp(k, "refused_retries") == 0) b->refused_retries += n;
    else if (strcmp(k, "read_errors") == 0) b->read_errors += n;
    else if (strcmp(k, "timeouts") == 0) b->timeouts += n;
    else if (strcmp(k, "hung") == 0) b->hung += n;
    else return luaL_argerror(L, 2, "unknown counter");
    return 0;
}

/* b:received(stream) -> the bytes a stream of an attached connection received (HEADERS,
 * CONTINUATION and DATA frames, their headers included): the hooks path's "read", counted
 * as conn:bench counts its own */
static int hb_received(lua_State *L)
{
    checkbench(L, 1);
    hstream **ud = luaL_checkudata(L, 2, HS_MT);
    lua_pushinteger(L, *ud ? (*ud)->rbytes : 0);
    return 1;
}

/* conn:attach(b): the connection's RST_STREAM and GOAWAY frames count in b, as conn:bench's
 * do (the bench's hooks path, whose requests go by conn:request) */
static int hc_attach(lua_State *L)
{
    hconn *c = checkconn(L);
    hbench *b = checkbench(L, 2);
    if (c->b && c->b != b) return luaL_error(L, "connection already benched");
    c->b = b;
    lua_settop(L, 2);
    lua_setiuservalue(L, 1, 2);     /* b outlives the connection */
    return 0;
}

static int bench_submit(hconn *c, hstream *st)
{
    nghttp2_data_provider prd;
    prd.source.ptr = st;
    prd.read_callback = read_body_out;
    if (c->bbodylen) {
        size_t avail;
        char *p = mw_buf_reserve(&st->out, NULL, c->bbodylen, &avail);
        if (!p) return -1;
        memcpy(p, c->bbody, c->bbodylen);
        mw_buf_commit(&st->out, c->bbodylen);
    }
    st->out_eof = 1;
    int32_t id = nghttp2_submit_request(c->session, NULL, c->bnv, c->bnvlen, c->bbodylen ? &prd : NULL, st);
    if (id < 0) return -1;
    st->id = id;
    st->in_session = 1;
    st->closed = 0;
    st->sent = 0;
    return 0;
}

/* Keeps a refused request (when due, retries used) for the next connection; -1: no memory
 * (it fails). */
static int requeue_push(hbench *b, int64_t t0, int retries)
{
    if (b->nrequeue == b->caprequeue) {
        size_t cap = b->caprequeue ? 2 * b->caprequeue : 64;
        struct requeued *q = realloc(b->requeue, cap * sizeof *q);
        if (!q) return -1;
        b->requeue = q;
        b->caprequeue = cap;
    }
    b->requeue[b->nrequeue].t0 = t0;
    b->requeue[b->nrequeue++].retries = retries;
    return 0;
}

/* A bench request's stream closed: count it (latency from when it was due), or submit it
 * again when the server refused it (REFUSED_STREAM or above a GOAWAY's last stream id).
 * A REFUSED_STREAM reset goes again once. One a connection going away never processed
 * (never sent, or above the GOAWAY's last stream id: nginx's graceful GOAWAY after
 * http2_max_requests) goes to the next connection without using that retry, however many
 * connections go away under it: it is not a failure of the request. (It cannot spin: a
 * connection going away takes no new requests, and the next one is opened as paced by
 * bench/h2.lua; those left at the end are hung.) Answered after the run ended (b->stop: the
 * drain) it is not counted, as over HTTP/1.1 (bench/engine.lua's record). */
static void bench_done(hconn *c, hstream *st)
{
    hbench *b = c->b;
    int unprocessed = !st->head_done && (!st->sent || (c->goaway_recv && st->id > c->goaway_last));
    int refused = unprocessed || (!st->head_done && st->close_code == NGHTTP2_REFUSED_STREAM);
    int going = c->goaway_recv || c->goaway_sent || c->fatal;
    if (b && refused && st->retries < 1 && !going) {
        st->retries++;
        b->refused_retries++;
        mw_buf_free(&st->out, NULL);
        st->status = 0;
        st->rbytes = 0;
        if (bench_submit(c, st) == 0) return;
    }
    c->active--;
    if (b) {
        if (st->head_done && st->close_code == NGHTTP2_NO_ERROR && st->body_done) {
            if (b->stop) goto gone;   /* answered during the drain */
            int64_t us = (mw_loop_clock() - st->t0) / 1000;
            if (us < 0) us = 0;
            mw_hdr_record(b->latency, (uint64_t)us);
            mw_hdr_record(b->second, (uint64_t)us);
            b->count++;
            b->bytes += st->rbytes;
            c->answered++;
            if (st->status > 0 && st->status < 600) b->statuses[st->status]++;
            if (st->status > 399) b->status_errors++;
        } else if (refused && going && unprocessed && requeue_push(b, st->t0, st->retries) == 0) {
            b->refused_retries++;   /* never processed: the next connection sends it */
        } else if (refused && st->retries < 1 && requeue_push(b, st->t0, 1) == 0) {
            b->refused_retries++;   /* refused by a connection going away: sent again once */
        } else {
            b->read_errors++;
        }
    }
gone:
    MW_LIST_UNLINK(c->streams, st, prev, next);
    stream_free(st);
}

static int bench_k(lua_State *L, int status, lua_KContext ctx);

static void read_spec(lua_State *L, int idx, bspec *sp)
{
    sp->streams = (int)optnum(L, idx, "streams", 1);
    sp->interval = (int64_t)optnum(L, idx, "interval_ns", 0);
    sp->next_send = (int64_t)optnum(L, idx, "next_send", 0);
    sp->end = (int64_t)optnum(L, idx, "end_ns", 0);
    sp->drain_end = (int64_t)optnum(L, idx, "drain_ns", 0);
    sp->timeout = (int64_t)optnum(L, idx, "timeout_ns", 2e9);
    if (sp->streams < 1) sp->streams = 1;
}

static void bench_leave(hconn *c)
{
    hbench *b = c->b;
    c->btask = NULL;
    /* the run is over: TLS gives its record buffers back (hc_bench held them) */
    if (c->sock && c->sock->tp->trim) c->sock->tp->trim(c->sock, 0);
    if (!b) return;
    hconn **pp = &b->running;
    while (*pp && *pp != c) pp = &(*pp)->bnext;
    if (*pp) *pp = c->bnext;
    c->bnext = NULL;
}

/* returns with the spec's next_send written back: the reason as a string, the requests
 * answered on the connection */
static int bench_return(lua_State *L, hconn *c, const bspec *sp, const char *why)
{
    lua_pushinteger(L, sp->next_send);
    lua_setfield(L, 3, "next_send");
    bench_leave(c);
    lua_pushstring(L, why);
    lua_pushinteger(L, c->answered);
    return 2;
}

static int bench_step(lua_State *L, hconn *c, mw_task *t)
{
    bspec sp = c->sp;
    hbench *b = c->b;
    int rounds = 0;
    for (;;) {
        int64_t now = mw_loop_clock();
        int stopping = b->stop || now >= sp.end;
        if (c->fatal) {
            b->read_errors += c->active;
            return bench_return(L, c, &sp, c->errcode && strcmp(c->errcode, "closed") == 0 ? "closed" : "error");
        }
        if (stopping) {
            if (c->active == 0) return bench_return(L, c, &sp, "done");
            if (now >= sp.drain_end) {
                b->hung += c->active;
                return bench_return(L, c, &sp, "hung");
            }
        }
        /* the peer's limit, and whether the connection may take more */
        uint32_t peer = nghttp2_session_get_remote_settings(c->session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
        int limit = sp.streams < (int64_t)peer ? sp.streams : (int)peer;
        int may = !stopping && !c->goaway_recv && !c->goaway_sent;
        if (!may && c->active == 0) return bench_return(L, c, &sp, c->goaway_recv ? "goaway" : "done");
        int64_t wake_at = stopping ? sp.drain_end : sp.end;
        while (may && c->active < limit) {
            /* first the requests a connection going away refused, due when they were, once;
             * then the next of the schedule */
            int retry = b->nrequeue > 0, retries = 0;
            int64_t t0 = now;
            if (retry) {
                t0 = b->requeue[b->nrequeue - 1].t0;
                retries = b->requeue[b->nrequeue - 1].retries;
            } else if (sp.interval > 0) {
                if (sp.next_send >= sp.end) break;   /* due at or after the end: not sent */
                if (sp.next_send > now) {
                    if (sp.next_send < wake_at) wake_at = sp.next_send;
                    break;
                }
                t0 = sp.next_send;
            }
            hstream *st = new_stream(c);
            if (!st) return luaL_error(L, "not enough memory");
            if (c->active == 0) c->last_progress = now;
            st->bench = 1;
            st->retries = retries;
            st->t0 = t0;
            if (bench_submit(c, st) < 0) {
                MW_LIST_UNLINK(c->streams, st, prev, next);
                stream_free(st);
                c->goaway_sent = 1;   /* stream ids exhausted: a new connection sends it */
                break;
            }
            if (retry) b->nrequeue--;
            else if (sp.interval > 0) sp.next_send += sp.interval;
            c->active++;
        }
        if (c->active > 0) {
            /* no byte from the server for `timeout` while requests are in flight */
            int64_t td = c->last_progress + sp.timeout;
            if (td <= now) {
                /* while draining at the end they are still unanswered: hung, as over HTTP/1.1 */
                if (stopping) {
                    b->hung += c->active;
                    return bench_return(L, c, &sp, "hung");
                }
                b->timeouts += c->active;
                return bench_return(L, c, &sp, "timeout");
            }
            if (td < wake_at) wake_at = td;
        }
        c->sp = sp;
        /* the loop clock and hrtime are the same monotonic clock */
        mw_task **slot = &c->btask;
        c->btask = t;
        int r = io_round(L, c, t, slot, wake_at, bench_k, 0);
        if (r >= 0) return r;
        c->btask = NULL;
        /* progress: submit again; now and then let the other tasks run */
        if (++rounds >= MW_STREAK_MAX) {
            c->btask = t;
            return mw_sched_requeue(L, t, bench_k, 0);
        }
    }
}

static int bench_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    hconn *c = lua_touserdata(L, 1);
    mw_task *t = c->rt->current;
    int why = mw_sched_reason(t);
    if (!c->session) return mw_pushfail(L, "closed", "closed");
    c->btask = NULL;
    if (why == MW_WAKE_TIMEOUT) why = MW_WAKE_READY;   /* a deadline of ours: looked at in the step */
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) {
        bench_leave(c);
        return mw_sched_pushwake(L, why);
    }
    return bench_step(L, c, t);
}

/* conn:bench(b, spec) -> reason, answered: runs requests on the connection until the run ends or
 * the connection does ("done", "goaway", "timeout", "closed", "error", "hung"), keeping
 * spec.streams of them in flight (at most the peer's MAX_CONCURRENT_STREAMS). spec: method,
 * scheme, authority, path, headers (flat list), body, streams, interval_ns (0: closed
 * model; else one request per interval, latency counted from when it was due),
 * next_send, end_ns, drain_ns, timeout_ns (no progress for that long with requests in
 * flight: they count as timeouts and the connection ends). No Lua runs per request. */
static int hc_bench(lua_State *L)
{
    hconn *c = checkconn(L);
    hbench *b = checkbench(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    mw_task *t = mw_sched_self(L, c->rt);
    if (c->b && c->b != b) return luaL_error(L, "connection already benched");
    lua_settop(L, 3);
    if (!c->bnv) {
        lua_getfield(L, 3, "method");
        lua_getfield(L, 3, "scheme");
        lua_getfield(L, 3, "authority");
        lua_getfield(L, 3, "path");
        lua_getfield(L, 3, "headers");
        int fidx = lua_gettop(L);
        if (!lua_istable(L, fidx)) {
            lua_newtable(L);
            lua_replace(L, fidx);
        }
        int nh = (int)lua_rawlen(L, fidx) / 2;
        nvlist *l = build_nv(L, 4, fidx, nh, 1);
        if (h2_nv_bound(l->nv, (size_t)l->n) > H2_MAX_SEND_HEAD) {
            free(l);
            return luaL_error(L, "request head too large for HTTP/2 (64 KiB at most)");
        }
        /* copy names and values: the nv list outlives the Lua strings */
        size_t total = 0;
        for (int i = 0; i < l->n; i++) total += l->nv[i].namelen + l->nv[i].valuelen;
        c->bstore = malloc(total ? total : 1);
        c->bnv = malloc(sizeof(nghttp2_nv) * (size_t)l->n);
        if (!c->bstore || !c->bnv) {
            free(l);
            bench_free_spec(c);
            return luaL_error(L, "not enough memory");
        }
        char *p = c->bstore;
        for (int i = 0; i < l->n; i++) {
            nghttp2_nv nv = l->nv[i];
            memcpy(p, nv.name, nv.namelen);
            c->bnv[i].name = (uint8_t *)p;
            p += nv.namelen;
            memcpy(p, nv.value, nv.valuelen);
            c->bnv[i].value = (uint8_t *)p;
            p += nv.valuelen;
            c->bnv[i].namelen = nv.namelen;
            c->bnv[i].valuelen = nv.valuelen;
            c->bnv[i].flags = NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE;
        }
        c->bnvlen = (size_t)l->n;
        free(l);
        lua_settop(L, 3);
        size_t blen = 0;
        lua_getfield(L, 3, "body");
        const char *body = lua_tolstring(L, -1, &blen);
        if (body && blen) {
            c->bbody = malloc(blen);
            if (!c->bbody) return luaL_error(L, "not enough memory");
            memcpy(c->bbody, body, blen);
            c->bbodylen = blen;
        }
        lua_settop(L, 3);
    }
    /* a run keeps the connection busy: TLS holds its record buffers until bench_leave
     * instead of a malloc and a free per record */
    if (c->sock && c->sock->tp->trim) c->sock->tp->trim(c->sock, 1);
    c->b = b;
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, 1, 2);     /* b outlives the connection */
    c->bnext = b->running;
    b->running = c;
    c->last_progress = mw_loop_clock();
    c->answered = 0;
    read_spec(L, 3, &c->sp);
    return bench_step(L, c, t);
}

void mw_h2client_open(lua_State *L)
{
    static const luaL_Reg conn_m[] = {
        { "request", hc_request }, { "usable", hc_usable }, { "streams", hc_streams }, { "idle", hc_idle }, { "poll", hc_poll },
        { "info", hc_info }, { "close", hc_close }, { "retire", hc_retire }, { "bench", hc_bench },
        { "attach", hc_attach }, { NULL, NULL }
    };
    static const luaL_Reg st_m[] = {
        { "head", hs_head }, { "read", hs_read }, { "write", hs_write }, { "set_trailers", hs_set_trailers },
        { "trailers", hs_trailers }, { "state", hs_state }, { "reset", hs_reset }, { NULL, NULL }
    };
    static const luaL_Reg bench_m[] = {
        { "stop", hb_stop }, { "count", hb_count }, { "stats", hb_stats }, { "add", hb_add }, { "received", hb_received }, { NULL, NULL }
    };
    luaL_newmetatable(L, HC_MT);
    luaL_newlib(L, conn_m);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, hc_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, HS_MT);
    luaL_newlib(L, st_m);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, hs_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, HB_MT);
    luaL_newlib(L, bench_m);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, hb_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_h2_client);
    lua_setfield(L, -2, "h2_client");
    lua_pushcfunction(L, l_h2_bench);
    lua_setfield(L, -2, "h2_bench");
    lua_pushcfunction(L, l_h2_check_fields);
    lua_setfield(L, -2, "h2_check_fields");
    lua_pushinteger(L, MAX_INTERIM);            /* client.lua's HTTP/1.1 limit: the same one */
    lua_setfield(L, -2, "http_max_interim");
}
