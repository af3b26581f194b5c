/* h2: HTTP/2 server connections on libnghttp2. One C-owned nghttp2_session per connection,
 * fed by the stream layer's reads (plain or TLS) in the connection's task (h2:run), its
 * output gathered into the socket's output buffer up to a high-water mark; while that is
 * backed up the connection reads nothing, so floods of PING or SETTINGS cannot grow memory.
 * Lua never sees frames: h2:run starts a handler per request stream in a worker, which
 * answers through H2Stream methods with the same contract as HttpConn's (read_body,
 * headers_of, trailers, ...).
 * nghttp2 callbacks never call Lua: they record into the stream structs and wake tasks. */
#define _GNU_SOURCE
#include "h2.h"
#include "http.h"
#include "stream.h"
#include "mwlua.h"
#include "list.h"
#include "h2fields.h"
#include "h2mem.h"

#include <errno.h>
#include <nghttp2/nghttp2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Options a Debian-patched 1.52 has without saying so in its version: found by symbol. */
extern void nghttp2_option_set_max_continuations(nghttp2_option *, size_t) __attribute__((weak));
extern void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *, uint64_t, uint64_t)
    __attribute__((weak));

#define H2_MT "moonwire.H2Conn"
#define H2S_MT "moonwire.H2Stream"
#define H2S_MAGIC UINT64_C(0x6d7768327374726d)   /* "mwh2strm": see mw_udata_magic */

/* The H2Stream userdata: a box for the stream (freed by whichever of nghttp2 and Lua lets
 * go last), told on the hot path by its size and magic number. */
typedef struct h2box {
    uint64_t magic;
    struct h2stream *st;
} h2box;

typedef struct h2conn h2conn;
typedef struct h2stream h2stream;

struct h2stream {
    int32_t id;
    h2conn *c;                 /* NULL once the connection is gone */
    mw_rt *rt;
    unsigned in_session : 1;   /* nghttp2 still knows the stream */
    unsigned lua_owned : 1;    /* an H2Stream userdata points here */
    unsigned closed : 1;       /* closed by nghttp2 (reset, or done both ways) */
    unsigned head_done : 1;    /* the request head is complete */
    unsigned body_done : 1;    /* END_STREAM received */
    unsigned handler : 1;      /* Lua runs a handler for it: counts against max_streams */
    unsigned queued : 1;       /* on c's event queue */
    unsigned seen : 1;         /* Lua got its request */
    unsigned responded : 1;    /* a response head was submitted */
    unsigned out_eof : 1;      /* the response body is complete */
    unsigned deferred : 1;     /* the data provider said DEFERRED */
    unsigned expect : 1;       /* Expect: 100-continue, not answered yet */
    unsigned bad : 1;          /* the head broke a rule: RST, no handler */
    unsigned tunnel : 1;       /* st:tunnel(): a WebSocket's bytes go through the stream (RFC
                                * 8441), read and written by tasks of its own: a reset or the
                                * connection's end reaches the WebSocket through them (they
                                * fail, it closes with 1006), never by cancelling the handler */
    unsigned data_eof : 1;     /* the data provider gave its last piece (END_STREAM, or the
                                * trailers that carry it, are packed) */
    unsigned rst_after_eof : 1;  /* RST_STREAM(NO_ERROR) once that is out (st_done) */
    uint32_t close_code;
    int64_t content_length;    /* the request's, -1 unknown */
    int64_t received;          /* DATA bytes of the request */
    uint64_t owed;             /* DATA bytes sent on it that the client has not given back yet */
    size_t unconsumed;         /* received, window not given back yet (consumed()) */
    size_t hbytes;             /* decoded header list size */
    fields head, trailers, trout;
    mw_buf in, out;            /* request body not read yet; response body not sent yet */
    mw_task *reader, *writer;  /* a handler waiting for body bytes / for room to write */
    mw_task *task;             /* the worker running its handler, until st:done(); anchored
                                * by the H2Stream userdata (its user value 2) */
    h2stream *qnext;           /* the event queue */
    h2stream *prev, *next;     /* every stream of the connection */
};

struct h2conn {
    /* the session: used through sess(c) only, which puts it back first when it was stowed
     * (stow_idle); the pointer itself may be tested (NULL: the connection is over) */
    nghttp2_session *ngs;
    mw_sock *sock;
    mw_rt *rt;
    mw_task *task;             /* the task in h2:run, while it waits */
    int nfix;                  /* h2:run(fn, ...): how many values follow fn (stack 3..) */
    int mt_idx;                /* ... and where the H2Stream metatable is on its stack */
    int ending;                /* the connection is over: h2:run ends once its handlers have */
    mw_task *over_waiter;      /* ... h2:run's task while it waits for them (cleared by its
                                * unwait however the wait ends: never dangles) */
    int reading;               /* ... waits for the socket to be readable (not to drain) */
    h2stream *qhead, *qtail;   /* streams with an event for Lua (a request, a reset) */
    h2stream *streams;
    h2stream *hst;             /* the stream of the header block being decoded (a block's
                                * frames come without any other frame between them): on_header
                                * needs no lookup per field; cleared when nghttp2 closes that
                                * stream or it is freed) */
    int handlers;              /* handlers running (reset ones included) */
    int nopen;                 /* streams nghttp2 still has (not closed) */
    int fatal;                 /* the session failed: finish what is queued, then close */
    int goaway;                /* a GOAWAY was submitted */
    int graceful;              /* ... by Server:close(): in-flight handlers may finish */
    int preface_seen;
    int hdr_open;              /* header blocks begun, not finished */
    int64_t head_deadline;     /* for the preface and an unfinished header block */
    int64_t idle_since;
    int64_t settings_sent;     /* our SETTINGS not acknowledged yet since (0: none pending) */
    /* HPACK parking (park): our SETTINGS frames submitted and acknowledged so far, and the
     * number of the one that set the client's table to 0 (0: the table is not parked) */
    uint32_t settings_tx, settings_acked, park_seq;
    int park_acked;            /* that one has been acknowledged: the table is empty */
    int park_hpack;            /* the option: parking on (else our encoder indexes, as nghttp2's does) */
    uint32_t parks;
    uint32_t hpack_trims;      /* times the rings' page went back (both tables empty, its area too) */
    uint32_t stows;            /* times an idle spell stowed the session (stow_idle) */
    uint32_t glitches;         /* frames that did no work (floods) */
    uint64_t data_bytes;       /* DATA payload both ways */
    uint64_t owed;             /* DATA bytes sent that the client has not given back yet */
    uint32_t requests;
    /* nghttp2 keeps no closed stream (no_closed_streams: a closed one cost ~230 bytes and
     * kept the stream map's page resident, up to max_streams of them per idle connection),
     * so RFC 9113 §5.1's STREAM_CLOSED is ours: of the 64 client streams up to closed_hi,
     * bit k of closed_rd is stream closed_hi - 2k, closed after the client ended its side
     * (END_STREAM or RST_STREAM received). A DATA or HEADERS on one of them is a connection
     * error STREAM_CLOSED; on any other closed stream it is ignored, as after our own
     * RST_STREAM it must be (and as nghttp2 did once it had let go of a closed stream). */
    int32_t closed_hi;
    uint64_t closed_rd;
    int closed_err;            /* ... and that error was submitted */
    /* the frame scanner over the bytes fed to nghttp2 (feed): what is left of the preface or
     * of the frame being fed, the header being put together across reads */
    uint32_t fskip;
    int32_t fhi;               /* the highest stream id of a HEADERS it read */
    uint8_t fhlen;
    uint8_t fhdr[9];
    /* limits and timeouts */
    uint32_t max_streams, stream_window, conn_window, max_fields, max_header_bytes;
    size_t hwm, out_hwm;
    double t_head, t_idle, t_write, t_settings;
    double t_trim;             /* idle this long: the session's spare pages go back (h2mem.h) */
    int64_t trimmed_for;       /* the idle_since of the last trim */
    uint32_t trims;
    uint32_t max_glitches;
    /* the Date header, cached per second */
    time_t date_sec;
    char date[40];
    mw_h2mem mem;              /* the session's allocator */
};

/* ---- small helpers ----------------------------------------------------------------------- */

/* The session, put back first if an idle spell stowed it (stow_idle): nghttp2 reads and
 * writes the stowed pages (its session struct is one), so every use goes through here. */
static inline nghttp2_session *sess(h2conn *c)
{
    if (c->mem.stowed) mw_h2mem_unstow(&c->mem);
    return c->ngs;
}

static void stream_free(h2stream *st)
{
    if (st->c && st->c->hst == st) st->c->hst = NULL;
    fields_free(&st->head);
    fields_free(&st->trailers);
    fields_free(&st->trout);
    free(st->in.data);
    free(st->out.data);
    mw_h2mem_release(st);
}

/* Frees st once neither nghttp2 nor Lua refers to it (and it waits in no queue). */
static void stream_release(h2stream *st)
{
    if (st->in_session || st->lua_owned || st->queued) return;
    if (st->c) MW_LIST_UNLINK(st->c->streams, st, prev, next);
    stream_free(st);
}

/* A request stream nghttp2 knows (its stream user data), on the connection's list. */
static h2stream *stream_new(h2conn *c, int32_t id)
{
    h2stream *st = mw_h2mem_alloc(sizeof *st);
    if (!st) return NULL;
    memset(st, 0, sizeof *st);
    st->id = id;
    st->c = c;
    st->rt = c->rt;
    st->in_session = 1;
    c->nopen++;
    st->content_length = -1;
    MW_LIST_PUSH(c->streams, st, prev, next);
    nghttp2_session_set_stream_user_data(sess(c), id, st);
    return st;
}

static void consumed(h2stream *st, size_t n);

static void queue_event(h2conn *c, h2stream *st)
{
    if (st->queued) return;
    st->queued = 1;
    st->qnext = NULL;
    if (c->qtail) c->qtail->qnext = st;
    else c->qhead = st;
    c->qtail = st;
    if (c->task) mw_sched_wake(c->task, MW_WAKE_READY);
}

static h2stream *pop_event(h2conn *c)
{
    h2stream *st = c->qhead;
    if (!st) return NULL;
    c->qhead = st->qnext;
    if (!c->qhead) c->qtail = NULL;
    st->queued = 0;
    st->qnext = NULL;
    return st;
}

static void wake(mw_task **slot)
{
    if (*slot) mw_sched_wake(*slot, MW_WAKE_READY);
}

/* Gathers what nghttp2 has to send into the socket's output buffer, up to the high-water
 * mark (the rest stays in nghttp2 until the buffer drains). 0, or -1 when the session
 * failed (c->fatal). When it stops at the mark, the connection's task is woken so that it
 * waits for the socket to drain instead of reading. */
static int flush_session(h2conn *c)
{
    mw_sock *s = c->sock;
    if (s->closed) {
        c->fatal = 1;
        return -1;
    }
    int r = h2_drain(sess(c), s, c->hwm);
    c->mem.drained = r == 0;
    if (r < 0) {
        c->fatal = 1;
        return -1;
    }
    if (r == 1 && nghttp2_session_want_write(sess(c)) && c->task) mw_sched_wake(c->task, MW_WAKE_READY);
    return 0;
}

/* A handler submitted something: the connection's task draws it out on its next turn, with
 * whatever the other handlers of this turn submit (one pass of mem_send for them all). When
 * the task is not parked in h2:run it is already queued to run, and flushes then. */
static void kick(h2conn *c)
{
    if (c->task) mw_sched_wake(c->task, MW_WAKE_READY);
}

static int hpack_empty(h2conn *c)
{
    return nghttp2_session_get_hd_inflate_dynamic_table_size(sess(c)) == 0 &&
           nghttp2_session_get_hd_deflate_dynamic_table_size(sess(c)) == 0;
}

/* An idle session's spare pages go back (h2mem.h): the frame buffer's, the zero ones, and
 * the rings' page (with the blocks a request left in its area) while both tables are empty. */
static void trim_session(h2conn *c)
{
    mw_h2mem_trim(&c->mem);
    if (hpack_empty(c) && mw_h2mem_trim_hpack(&c->mem) > 0) c->hpack_trims++;
}

/* An idle connection, once trimmed in this idle spell, waits with its session stowed
 * (h2mem.h): the session struct's page, the rings' page and the stream map's go back, the
 * few hundred bytes of them that matter copied aside, until the next frame, timer or call
 * reaches the session through sess(). Only with nothing pending: no handler, no stream, no
 * header block, nothing nghttp2 wants to send. */
static void stow_idle(h2conn *c)
{
    if (c->mem.stowed || c->trimmed_for != c->idle_since || c->handlers > 0 || c->nopen > 0 ||
        c->hdr_open > 0 || c->fatal || nghttp2_session_want_write(sess(c)))
        return;
    mw_h2mem_stow(&c->mem, hpack_empty(c));
    if (c->mem.stowed) c->stows++;
}

/* ---- HPACK parking (the option park_hpack) ------------------------------------------------ *
 * An idle connection's HPACK state is the client's: the fields its requests indexed stay in
 * our decoder's table (pointers in a ring on a page h2mem keeps apart, the entries in that
 * page's area when they fit, else on the heap), and only the client may evict them. So when
 * a connection has been idle for trim_after (resume_step) and its table holds anything, it
 * sends SETTINGS_HEADER_TABLE_SIZE 0; once the
 * client acknowledges it, nghttp2 has emptied the table, and the rings' page goes back
 * (park_done). The next request sets the table back to 4,096 bytes (RFC 9113 §6.5.2). Every
 * request decodes around it: the table is emptied only at the acknowledgement, and the client
 * signals the smallest size it was given first (RFC 7541 §4.2). A client that reads nothing
 * while idle (a pool) acknowledges when it uses the connection again: no settings_timeout is
 * armed for these SETTINGS. With the option our encoder indexes nothing (max_deflate_dynamic_
 * table_size 0, as nginx's), so its table stays empty and its ring is never written. That
 * costs ~1.6-1.9k instructions per small response (its fields Huffman-coded each time), and
 * some clients ignore a lowered table size (RFC 9113 §6.5.2): the option is off by default. */
static void unpark(h2conn *c)
{
    nghttp2_settings_entry iv = { NGHTTP2_SETTINGS_HEADER_TABLE_SIZE, 4096 };
    if (nghttp2_submit_settings(sess(c), NGHTTP2_FLAG_NONE, &iv, 1) == 0) c->settings_tx++;
    c->park_seq = 0;
    c->park_acked = 0;
}

static void park(h2conn *c)
{
    if (!c->park_hpack || c->park_seq || c->goaway ||
        nghttp2_session_get_hd_inflate_dynamic_table_size(sess(c)) == 0) return;
    nghttp2_settings_entry iv = { NGHTTP2_SETTINGS_HEADER_TABLE_SIZE, 0 };
    if (nghttp2_submit_settings(sess(c), NGHTTP2_FLAG_NONE, &iv, 1) != 0) return;
    c->park_seq = ++c->settings_tx;
    c->parks++;
}

/* After the feed that carried the parking SETTINGS' acknowledgement: the rings' page and
 * the frame buffer (written by that SETTINGS) go back, if the connection is still idle. */
static void park_done(h2conn *c)
{
    c->park_acked = 0;
    if (c->handlers > 0 || c->nopen > 0 || c->hdr_open > 0 || !hpack_empty(c)) return;
    trim_session(c);
    c->trimmed_for = c->idle_since;
}

/* ---- nghttp2 callbacks (no Lua here) ------------------------------------------------------ */

static int on_begin_headers(nghttp2_session *ss, const nghttp2_frame *f, void *ud)
{
    h2conn *c = ud;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    /* handlers still running count, reset ones included: a client that resets streams
     * cannot make us run more than max_streams handlers at once */
    if ((uint32_t)c->handlers >= c->max_streams || c->goaway) {
        nghttp2_submit_rst_stream(ss, NGHTTP2_FLAG_NONE, f->hd.stream_id, NGHTTP2_REFUSED_STREAM);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    h2stream *st = stream_new(c, f->hd.stream_id);
    if (!st) return NGHTTP2_ERR_CALLBACK_FAILURE;
    if (c->park_seq) unpark(c);
    c->hst = st;
    c->hdr_open++;
    if (c->hdr_open == 1) c->head_deadline = mw_sched_after(c->rt, c->t_head);
    return 0;
}

static int on_header(nghttp2_session *ss, const nghttp2_frame *f, const uint8_t *n, size_t nl,
                     const uint8_t *v, size_t vl, uint8_t flags, void *ud)
{
    h2conn *c = ud;
    (void)flags;
    h2stream *st = c->hst;
    if (!st || st->id != f->hd.stream_id) {
        st = nghttp2_session_get_stream_user_data(ss, f->hd.stream_id);   /* trailers */
        c->hst = st;
    }
    if (!st || st->bad) return 0;
    /* nghttp2 limits no header list size: count it here (RFC 9113 §10.5.1 overhead) */
    st->hbytes += nl + vl + 32;
    fields *dst = st->head_done ? &st->trailers : &st->head;
    if ((uint32_t)dst->n >= c->max_fields || st->hbytes > c->max_header_bytes) {
        st->bad = 1;
        nghttp2_submit_rst_stream(ss, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_ENHANCE_YOUR_CALM);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    /* nghttp2 checks pseudo-headers, case, connection-specific fields and TE itself; not a
     * fragment in :path, which a request target never has (RFC 9113 §8.3.1, as http.c's
     * target_bad on HTTP/1.1): malformed */
    if (h2_conn_specific((const char *)n, nl)) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    if (nl == 5 && memcmp(n, ":path", 5) == 0 && memchr(v, '#', vl)) {
        st->bad = 1;
        nghttp2_submit_rst_stream(ss, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_PROTOCOL_ERROR);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    if (nl == 14 && memcmp(n, "content-length", 14) == 0) {
        int64_t len = 0;
        for (size_t i = 0; i < vl; i++) len = len * 10 + (v[i] - '0');  /* nghttp2 checked digits */
        st->content_length = len;
    }
    if (nl == 6 && memcmp(n, "expect", 6) == 0 && vl == 12 && strncasecmp((const char *)v, "100-continue", 12) == 0)
        st->expect = 1;
    if (fields_add(dst, n, nl, v, vl) < 0) return NGHTTP2_ERR_CALLBACK_FAILURE;
    return 0;
}

/* A frame that did no work (an empty DATA, a PING, a SETTINGS, a PRIORITY, an RST_STREAM, a
 * WINDOW_UPDATE that gives back no credit: returned_credit): past the budget (the configured
 * allowance, plus two per request, plus one per 16 KiB of DATA either way, so real traffic
 * never runs out) the connection is ended with GOAWAY ENHANCE_YOUR_CALM. */
static void count_glitch(h2conn *c)
{
    uint64_t budget = (uint64_t)c->max_glitches + 2u * c->requests + c->data_bytes / 16384;
    if (++c->glitches > budget && !c->goaway) {
        c->goaway = 1;
        nghttp2_submit_goaway(sess(c), NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(sess(c)),
                              NGHTTP2_ENHANCE_YOUR_CALM, NULL, 0);
    }
}

/* A WINDOW_UPDATE that gives back credit for DATA we sent (1 KiB of it at least, or all
 * that was still owed) is flow control at work, not a useless frame: a client that gives
 * credit back every 4 KiB it reads, on the stream and on the connection (Go's transport),
 * sends two per 4 KiB, where the budget grows by one per 16 KiB. Smaller steps, or more than
 * was sent, count (a flood of them costs the client 1 KiB of our DATA per free frame). */
static int returned_credit(h2conn *c, h2stream *st, const nghttp2_frame *f)
{
    uint64_t *owed = f->hd.stream_id == 0 ? &c->owed : st ? &st->owed : NULL;
    uint64_t inc = (uint64_t)f->window_update.window_size_increment;
    if (!owed || *owed == 0) return 0;
    if (inc > *owed) {
        *owed = 0;
        return 0;
    }
    int earned = inc >= 1024 || inc == *owed;
    *owed -= inc;
    return earned;
}

static int on_frame_recv(nghttp2_session *ss, const nghttp2_frame *f, void *ud)
{
    h2conn *c = ud;
    h2stream *st = f->hd.stream_id ? nghttp2_session_get_stream_user_data(ss, f->hd.stream_id) : NULL;
    switch (f->hd.type) {
    case NGHTTP2_HEADERS:
        if (!st) return 0;
        if (!st->head_done) {
            if (c->hdr_open > 0) c->hdr_open--;
            st->head_done = 1;
            if (st->bad) return 0;
            c->requests++;
            if (f->hd.flags & NGHTTP2_FLAG_END_STREAM) st->body_done = 1;
            st->handler = 1;
            c->handlers++;
            queue_event(c, st);
        } else if (f->hd.flags & NGHTTP2_FLAG_END_STREAM) {
            st->body_done = 1;                     /* trailers */
            wake(&st->reader);
        }
        return 0;
    case NGHTTP2_DATA:
        if (f->hd.length == 0 && !(f->hd.flags & NGHTTP2_FLAG_END_STREAM)) count_glitch(c);
        if (st && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
            st->body_done = 1;
            if (st->content_length >= 0 && st->received != st->content_length) {
                nghttp2_submit_rst_stream(ss, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_PROTOCOL_ERROR);
                st->bad = 1;
            }
            wake(&st->reader);
        }
        return 0;
    case NGHTTP2_SETTINGS:
        if (f->hd.flags & NGHTTP2_FLAG_ACK) {
            c->settings_sent = 0;
            /* (nghttp2 has applied it: after the parking one, its HPACK decoder is empty) */
            if (++c->settings_acked == c->park_seq) c->park_acked = 1;
        } else {
            count_glitch(c);
        }
        return 0;
    case NGHTTP2_WINDOW_UPDATE:
        if (!returned_credit(c, st, f)) count_glitch(c);
        return 0;
    case NGHTTP2_RST_STREAM:
        /* On a stream already closed it counts twice: a flood of them then meets this
         * budget (GOAWAY ENHANCE_YOUR_CALM) at about 500, always before nghttp2's reset rate
         * limit (1,000 burst, GOAWAY INTERNAL_ERROR), where once each the two tripped within
         * a frame of each other and the clock picked which. Those on open streams (rapid
         * reset: each came with a request, two more of budget) are that limit's. */
        if (!st) count_glitch(c);
        count_glitch(c);
        return 0;
    case NGHTTP2_PING:
    case NGHTTP2_PRIORITY:
        count_glitch(c);
        return 0;
    default:
        return 0;
    }
}

static int on_data_chunk(nghttp2_session *ss, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *ud)
{
    h2conn *c = ud;
    (void)flags;
    h2stream *st = nghttp2_session_get_stream_user_data(ss, id);
    if (!st || st->bad || (st->seen && !st->handler)) {
        /* nobody reads it (a bad stream, or its handler is done): give the window back at once */
        nghttp2_session_consume(ss, id, len);
        return 0;
    }
    st->received += (int64_t)len;
    c->data_bytes += len;
    if (st->content_length >= 0 && st->received > st->content_length) {
        st->bad = 1;
        nghttp2_session_consume(ss, id, len);
        nghttp2_submit_rst_stream(ss, NGHTTP2_FLAG_NONE, id, NGHTTP2_PROTOCOL_ERROR);
        wake(&st->reader);
        return 0;
    }
    size_t avail;
    char *p = mw_buf_reserve(&st->in, &st->rt->pool, len, &avail);
    if (!p) return NGHTTP2_ERR_CALLBACK_FAILURE;
    memcpy(p, data, len);
    mw_buf_commit(&st->in, len);
    st->unconsumed += len;
    wake(&st->reader);
    return 0;
}

/* The client ended its side of stream id, which closes now (closed_rd). */
static void mark_closed(h2conn *c, int32_t id)
{
    if (id > c->closed_hi) {
        uint32_t sh = (uint32_t)(id - c->closed_hi) / 2;
        c->closed_rd = sh >= 64 ? 0 : c->closed_rd << sh;
        c->closed_hi = id;
    }
    uint32_t k = (uint32_t)(c->closed_hi - id) / 2;
    if (k < 64) c->closed_rd |= (uint64_t)1 << k;
}

static int closed_by_peer(const h2conn *c, int32_t id)
{
    if (!(id & 1) || id > c->closed_hi) return 0;
    uint32_t k = (uint32_t)(c->closed_hi - id) / 2;
    return k < 64 && (c->closed_rd >> k & 1);
}

static int on_stream_close(nghttp2_session *ss, int32_t id, uint32_t code, void *ud)
{
    h2conn *c = ud;
    /* still nghttp2's stream here: is its remote side shut (END_STREAM or RST received)? */
    if ((id & 1) && nghttp2_session_get_stream_remote_close(ss, id) == 1) mark_closed(c, id);
    h2stream *st = nghttp2_session_get_stream_user_data(ss, id);
    if (!st) return 0;
    nghttp2_session_set_stream_user_data(ss, id, NULL);
    if (c->hst == st) c->hst = NULL;     /* as the lookup would say from now on */
    st->in_session = 0;
    c->nopen--;
    st->closed = 1;
    st->close_code = code;
    if (!st->head_done && c->hdr_open > 0) c->hdr_open--;
    wake(&st->reader);
    wake(&st->writer);
    /* a reset while its handler runs: h2:run cancels the handler (run_event) */
    if (st->handler && st->seen && !(st->out_eof && st->responded && code == NGHTTP2_NO_ERROR))
        queue_event(c, st);
    if (st->handler && !st->seen && !st->queued) {
        st->handler = 0;
        c->handlers--;
    }
    stream_release(st);
    return 0;   /* never a fatal error here (CVE-2023-35945's path) */
}

/* A frame nghttp2 would not send. A HEADERS it found too large (a response, a 1xx or
 * trailers: respond_core and set_trailers check the same bound first, so only what gets
 * past them) leaves its stream open with nothing sent: the stream is reset instead, so the
 * client is not left waiting for it. */
static int on_frame_not_send(nghttp2_session *ss, const nghttp2_frame *f, int err, void *ud)
{
    (void)ud;
    if (f->hd.type == NGHTTP2_HEADERS && err == NGHTTP2_ERR_FRAME_SIZE_ERROR)
        nghttp2_submit_rst_stream(ss, NGHTTP2_FLAG_NONE, f->hd.stream_id, NGHTTP2_INTERNAL_ERROR);
    return 0;
}

static ssize_t read_body_out(nghttp2_session *ss, int32_t id, uint8_t *buf, size_t len,
                             uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    h2stream *st = src->ptr;
    (void)ud;
    ssize_t n = h2_body_read(ss, id, &st->out, &st->rt->pool, st->out_eof, &st->trout, buf, len, flags);
    if (n == NGHTTP2_ERR_DEFERRED) {
        st->deferred = 1;
        return n;
    }
    if (*flags & NGHTTP2_DATA_FLAG_EOF) {
        st->data_eof = 1;
        /* the response is complete and the handler ended before the request body did: the
         * client may stop sending it (RFC 9113 §8.1), once this last DATA (or the trailers
         * just submitted) has gone: an RST queued now goes out after them, not before */
        if (st->rst_after_eof) nghttp2_submit_rst_stream(ss, NGHTTP2_FLAG_NONE, id, NGHTTP2_NO_ERROR);
    }
    if (st->writer && mw_buf_len(&st->out) < st->c->out_hwm / 2) wake(&st->writer);
    st->c->data_bytes += (uint64_t)n;
    st->owed += (uint64_t)n;
    st->c->owed += (uint64_t)n;
    return n;
}

static h2conn *checkconn(lua_State *L)
{
    h2conn *c = luaL_checkudata(L, 1, H2_MT);
    if (!c->ngs) luaL_error(L, "attempt to use a closed HTTP/2 connection");
    return c;
}

static double optnum(lua_State *L, int t, const char *k, double d)
{
    lua_getfield(L, t, k);
    double v = luaL_optnumber(L, -1, d);
    lua_pop(L, 1);
    return v;
}

static void conn_free(h2conn *c)
{
    if (!c->ngs) return;
    /* the session goes without callbacks: its streams are ours to let go */
    h2stream *st = c->streams;
    while (st) {
        h2stream *nx = st->next;
        st->c = NULL;
        st->in_session = 0;
        st->queued = 0;
        st->closed = 1;
        wake(&st->reader);
        wake(&st->writer);
        if (!st->lua_owned) stream_free(st);
        st = nx;
    }
    c->streams = NULL;
    c->hst = NULL;
    c->qhead = c->qtail = NULL;
    nghttp2_session_del(sess(c));
    c->ngs = NULL;
    mw_h2mem_free(&c->mem);
}

static int h2_gc(lua_State *L)
{
    conn_free(luaL_checkudata(L, 1, H2_MT));
    return 0;
}

/* An HTTP/1.1 request upgraded to h2c (RFC 7540 §3.2) becomes stream 1, half-closed
 * (remote), answered on HTTP/2: up = { settings = <HTTP2-Settings, decoded>, head = <0|1>,
 * fields = { name, value, ... } } with the pseudo-header fields first. 0, or -1 when
 * memory ran out; a bad HTTP2-Settings payload makes the session end (fatal). */
static int upgrade(lua_State *L, h2conn *c, int idx)
{
    size_t n;
    lua_getfield(L, idx, "settings");
    const char *payload = luaL_checklstring(L, -1, &n);
    lua_getfield(L, idx, "head");
    int head = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (nghttp2_session_upgrade2(sess(c), (const uint8_t *)payload, n, head, NULL) != 0) {
        lua_pop(L, 1);
        c->fatal = 1;
        return 0;
    }
    lua_pop(L, 1);
    c->fhi = 1;        /* stream 1 exists though the scanner never read its HEADERS (feed) */
    h2stream *st = stream_new(c, 1);
    if (!st) return -1;
    lua_getfield(L, idx, "fields");
    int nf = (int)lua_rawlen(L, -1);
    for (int i = 1; i + 1 <= nf; i += 2) {
        size_t kl, vl;
        lua_rawgeti(L, -1, i);
        lua_rawgeti(L, -2, i + 1);
        const char *k = lua_tolstring(L, -2, &kl), *v = lua_tolstring(L, -1, &vl);
        if (k && v && fields_add(&st->head, (const uint8_t *)k, kl, (const uint8_t *)v, vl) < 0) return -1;
        lua_pop(L, 2);
    }
    lua_pop(L, 1);
    st->head_done = 1;
    st->body_done = 1;
    st->handler = 1;
    c->handlers++;
    c->requests++;
    queue_event(c, st);
    return 0;
}

/* core.h2_server(sock, opts, server [, upgrade]) -> H2Conn. opts: max_streams (100), stream_window
 * (256 KiB), conn_window (8 MiB), header_fields (128), header_bytes (64 KiB), hwm (64 KiB:
 * the socket output that pauses reading), out_hwm (64 KiB: a stream's queued body that
 * makes res:write wait), timeouts head/idle/write/settings (10/5/30/10 s), glitches (1000),
 * connect_protocol (bool: RFC 8441), trim_after (1 s), park_hpack (bool: park). The client's
 * preface may already be buffered. */
static int l_h2_server(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    h2conn *c = lua_newuserdatauv(L, sizeof *c, 2);
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, H2_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    lua_pushvalue(L, 3);
    lua_setiuservalue(L, -2, 2);
    c->sock = s;
    c->rt = s->rt;
    c->max_streams = (uint32_t)optnum(L, 2, "max_streams", 100);
    c->stream_window = (uint32_t)optnum(L, 2, "stream_window", 256 * 1024);
    c->conn_window = (uint32_t)optnum(L, 2, "conn_window", 8 * 1024 * 1024);
    c->max_fields = (uint32_t)optnum(L, 2, "header_fields", 128);
    c->max_header_bytes = (uint32_t)optnum(L, 2, "header_bytes", 65536);
    c->hwm = (size_t)optnum(L, 2, "hwm", 65536);
    c->out_hwm = (size_t)optnum(L, 2, "out_hwm", 65536);
    c->t_head = optnum(L, 2, "head_timeout", 10);
    c->t_idle = optnum(L, 2, "idle_timeout", 5);
    c->t_write = optnum(L, 2, "write_timeout", 30);
    c->t_settings = optnum(L, 2, "settings_timeout", 10);
    c->max_glitches = (uint32_t)optnum(L, 2, "glitches", 1000);
    c->t_trim = optnum(L, 2, "trim_after", 1);
    c->trimmed_for = -1;
    c->fskip = NGHTTP2_CLIENT_MAGIC_LEN;           /* the scanner starts after the preface */
    lua_getfield(L, 2, "connect_protocol");
    int connect_protocol = lua_toboolean(L, -1);
    lua_getfield(L, 2, "park_hpack");
    c->park_hpack = lua_toboolean(L, -1);
    lua_pop(L, 2);

    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cbs) != 0) return luaL_error(L, "not enough memory");
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_not_send_callback(cbs, on_frame_not_send);
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cbs);
        return luaL_error(L, "not enough memory");
    }
    /* the window is given back as the handler reads (nghttp2_session_consume) */
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_max_outbound_ack(opt, 1000);
    nghttp2_option_set_max_settings(opt, 32);
    nghttp2_option_set_no_closed_streams(opt, 1);   /* STREAM_CLOSED is ours (closed_rd) */
    if (c->park_hpack) nghttp2_option_set_max_deflate_dynamic_table_size(opt, 0);  /* (park) */
    if (nghttp2_option_set_max_continuations) nghttp2_option_set_max_continuations(opt, 8);
    if (nghttp2_option_set_stream_reset_rate_limit) nghttp2_option_set_stream_reset_rate_limit(opt, 1000, 33);
    mw_h2mem_init(&c->mem);
    mw_h2mem_begin(&c->mem);
    int rv = nghttp2_session_server_new3(&c->ngs, cbs, c, opt, &c->mem.hooks);
    mw_h2mem_end(&c->mem);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_option_del(opt);
    if (rv != 0) {
        mw_h2mem_free(&c->mem);
        return luaL_error(L, "nghttp2_session_server_new3: %s", nghttp2_strerror(rv));
    }

    nghttp2_settings_entry iv[5];
    int n = 0;
    iv[n++] = (nghttp2_settings_entry){ NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, c->max_streams };
    iv[n++] = (nghttp2_settings_entry){ NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, c->stream_window };
    iv[n++] = (nghttp2_settings_entry){ NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, c->max_header_bytes };
    iv[n++] = (nghttp2_settings_entry){ NGHTTP2_SETTINGS_ENABLE_PUSH, 0 };
    if (connect_protocol) iv[n++] = (nghttp2_settings_entry){ NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL, 1 };
    nghttp2_submit_settings(sess(c), NGHTTP2_FLAG_NONE, iv, (size_t)n);
    c->settings_tx = 1;
    if (c->conn_window > 65535)
        nghttp2_session_set_local_window_size(sess(c), NGHTTP2_FLAG_NONE, 0, (int32_t)c->conn_window);
    c->settings_sent = c->rt->loop.now;
    /* a busy connection: TLS keeps its record buffers between reads and writes until the
     * connection has been idle for trim_after (resume_step) */
    if (s->tp->trim) s->tp->trim(s, 1);
    c->head_deadline = mw_sched_after(c->rt, c->t_head);
    c->idle_since = c->rt->loop.now;
    if (lua_istable(L, 4) && upgrade(L, c, 4) < 0) return luaL_error(L, "not enough memory");
    return 1;
}

/* When an idle connection (no handler, no stream, no header block) gives its session's
 * spare pages back (h2mem.h), once per idle spell: MW_NO_DEADLINE if it did already. Not at
 * once: a client that sends its next request within trim_after pays no madvise and no page
 * faults for it. */
static int64_t trim_deadline(h2conn *c)
{
    if (c->t_trim < 0 || c->nopen > 0 || c->trimmed_for == c->idle_since) return MW_NO_DEADLINE;
    return c->idle_since + (int64_t)(c->t_trim * 1e9);
}

/* The deadline the connection's read waits under: the preface or an unfinished header
 * block (head timeout), an unacknowledged SETTINGS, an idle connection. */
static int64_t read_deadline(h2conn *c)
{
    int64_t d = MW_NO_DEADLINE;
    if (!c->preface_seen || c->hdr_open > 0) d = c->head_deadline;
    if (c->settings_sent && c->t_settings >= 0) {
        int64_t sd = c->settings_sent + (int64_t)(c->t_settings * 1e9);
        if (sd < d) d = sd;
    }
    if (c->handlers == 0 && c->hdr_open == 0 && c->preface_seen) {
        /* no handler runs: idle when no stream is left either; else the streams only wait
         * to send what their handlers left, and a client that neither reads nor opens the
         * window for the write timeout is cut off (a stream stuck at a zero window) */
        double t = c->nopen > 0 ? c->t_write : c->t_idle;
        if (t >= 0) {
            int64_t id = c->idle_since + (int64_t)(t * 1e9);
            if (id < d) d = id;
        }
        int64_t td = trim_deadline(c);
        if (td < d) d = td;
    }
    return d;
}

static int next_k(lua_State *L, int status, lua_KContext ctx);

/* Ends the connection's session: a GOAWAY (if none went yet) with `code`, flushed. */
static void end_session(h2conn *c, uint32_t code)
{
    if (!c->goaway) {
        c->goaway = 1;
        nghttp2_submit_goaway(sess(c), NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(sess(c)), code, NULL, 0);
    }
    c->fatal = 1;
    c->mem.drained = h2_drain(sess(c), c->sock, SIZE_MAX) == 0;   /* all of it, past hwm */
}

/* The event of st: a request gets its handler, fn(<the values after fn>, stream, method,
 * target, path, has_body) in a worker (core.dispatch's pool: no coroutine per stream); a
 * reset while the handler runs cancels the handler's pending call. */
static void run_event(lua_State *L, h2conn *c, h2stream *st)
{
    if (!st->seen) {
        st->seen = 1;
        if (st->closed || st->bad) {
            /* reset before Lua saw it: no handler at all; what its body brought is dropped
             * and its window given back (nghttp2 does not, for a closed stream) */
            st->handler = 0;
            c->handlers--;
            mw_buf_free(&st->in, &st->rt->pool);
            consumed(st, st->unconsumed);
            stream_release(st);
            return;
        }
        luaL_checkstack(L, c->nfix + 10, NULL);
        int base = lua_gettop(L);
        h2box *ud = lua_newuserdatauv(L, sizeof *ud, 2);
        ud->magic = H2S_MAGIC;
        ud->st = st;
        st->lua_owned = 1;
        lua_pushvalue(L, c->mt_idx);
        lua_setmetatable(L, -2);
        lua_pushvalue(L, 1);
        lua_setiuservalue(L, -2, 1);
        for (int i = 0; i <= c->nfix; i++) lua_pushvalue(L, 2 + i);     /* fn, its values */
        lua_pushvalue(L, base + 1);
        size_t ml = 0, pl = 0;
        const char *m = fields_getl(&st->head, ":method", &ml), *p = fields_getl(&st->head, ":path", &pl);
        /* a plain CONNECT has no :path, its target is :authority (RFC 9113 §8.5): target
         * and path as HTTP/1.1's authority-form target gives them */
        if (!p && m && ml == 7 && memcmp(m, "CONNECT", 7) == 0) p = fields_getl(&st->head, ":authority", &pl);
        lua_pushlstring(L, m ? m : "", ml);
        lua_pushlstring(L, p ? p : "", pl);
        /* the path: before any '?', %XX decoded (as HTTP/1.1's) */
        const char *pp = p ? p : "";
        const char *q = memchr(pp, '?', pl);
        size_t pn = q ? (size_t)(q - pp) : pl;
        if (pn == 0) lua_pushliteral(L, "/");
        else mw_http_push_decoded(L, pp, pn);
        lua_pushboolean(L, !st->body_done);
        mw_task *w = mw_sched_dispatch_n(c->rt, L, c->nfix + 5);
        lua_rawgeti(L, LUA_REGISTRYINDEX, w->ref);     /* the box anchors the worker's task */
        lua_setiuservalue(L, base + 1, 2);
        lua_settop(L, base);
        st->task = w;
        return;
    }
    if (st->task && !st->tunnel) mw_sched_cancel(st->task);
    stream_release(st);
}

/* Feeds nghttp2 the bytes at p (len > 0): what it took, or its error. On the way, each
 * frame's header is read (the frame scanner: fskip, fhdr) for RFC 9113 §5.1: a DATA or
 * HEADERS on a stream the client had ended (closed_by_peer) ends the connection with
 * STREAM_CLOSED. The frames before it are fed first when one of them may close a stream (an
 * RST_STREAM, an END_STREAM): the feed stops at its header, and the caller feeds the rest. */
static ssize_t feed(h2conn *c, const uint8_t *p, size_t len)
{
    size_t off = 0;
    int dirty = 0;             /* a frame fed in this call may close a stream */
    while (off < len) {
        if (c->fskip) {
            size_t k = len - off < c->fskip ? len - off : c->fskip;
            off += k;
            c->fskip -= (uint32_t)k;
            continue;
        }
        size_t k = 9u - c->fhlen;
        if (len - off < k) {
            /* a header cut by the read: its frame is checked once the rest has come, after
             * the frames before it (fed first if they may close a stream) */
            if (dirty && c->fhlen == 0 && off > 0) break;
            memcpy(c->fhdr + c->fhlen, p + off, len - off);
            c->fhlen = (uint8_t)(c->fhlen + (len - off));
            off = len;
            break;
        }
        const uint8_t *h = c->fhdr;
        if (c->fhlen) memcpy(c->fhdr + c->fhlen, p + off, k);
        else h = p + off;
        uint8_t type = h[3];
        int data_or_headers = type == NGHTTP2_DATA || type == NGHTTP2_HEADERS;
        int32_t sid = (int32_t)(((uint32_t)(h[5] & 0x7f) << 24) | ((uint32_t)h[6] << 16) | ((uint32_t)h[7] << 8) | h[8]);
        /* (a HEADERS opening a new stream is not on a closed one) */
        if (dirty && data_or_headers && sid <= c->fhi && c->fhlen == 0 && off > 0) break;
        if (data_or_headers && closed_by_peer(c, sid) && !c->closed_err) {
            /* (after a graceful GOAWAY too: the in-flight streams' peer broke the protocol) */
            c->goaway = c->closed_err = 1;
            nghttp2_session_terminate_session(sess(c), NGHTTP2_STREAM_CLOSED);
        }
        if (type == NGHTTP2_RST_STREAM || (data_or_headers && (h[4] & NGHTTP2_FLAG_END_STREAM))) dirty = 1;
        if (type == NGHTTP2_HEADERS && sid > c->fhi) c->fhi = sid;
        c->fskip = ((uint32_t)h[0] << 16) | ((uint32_t)h[1] << 8) | h[2];
        c->fhlen = 0;
        off += k;
    }
    c->mem.feeding = 1;
    ssize_t n = nghttp2_session_mem_recv(sess(c), p, off);
    c->mem.feeding = 0;
    return n;
}

static int next_step(lua_State *L, h2conn *c, mw_task *t)
{
    mw_sock *s = c->sock;
    for (int fills = 0;;) {
        h2stream *st;
        while ((st = pop_event(c)) != NULL) run_event(L, c, st);
        if (!c->fatal) flush_session(c);
        if (c->fatal || (!nghttp2_session_want_read(sess(c)) && !nghttp2_session_want_write(sess(c)))) {
            if (c->handlers > 0 && c->graceful && !c->fatal && !s->closed) {
                /* our graceful GOAWAY went out; in-flight handlers finish: wait for them (a
                 * connection error ends at once instead: run_over cancels the handlers) */
                c->task = t;
                return mw_sched_wait(L, t, MW_NO_DEADLINE, next_k, 0);
            }
            return mw_pushfail(L, "closed", "closed");
        }
        if (mw_buf_len(&s->obuf) >= c->hwm) {
            /* backed up: write, and read nothing until the output drains */
            uint32_t want = EPOLLOUT;
            int r = mw_sock_flush(s, &want);
            if (r < 0) return mw_stream_pusherr(L, s, errno);
            if (mw_buf_len(&s->obuf) >= c->hwm)
                return mw_sock_wait(L, s, t, MW_ROLE_WRITE, want, mw_sched_after(c->rt, c->t_write), next_k, 0);
            continue;
        }
        size_t len = mw_buf_len(&s->rbuf);
        if (len > 0) {
            ssize_t n = feed(c, (const uint8_t *)mw_buf_head(&s->rbuf), len);
            if (n < 0) {
                /* a connection error: nghttp2 queued its GOAWAY (or the peer broke the
                 * preface, or a flood limit hit): send what is queued, then close */
                end_session(c, n == NGHTTP2_ERR_FLOODED ? NGHTTP2_ENHANCE_YOUR_CALM : NGHTTP2_PROTOCOL_ERROR);
                continue;
            }
            if (!c->preface_seen && n > 0) c->preface_seen = 1;
            mw_buf_consume(&s->rbuf, (size_t)n);
            s->scan = 0;
            c->idle_since = c->rt->loop.now;
            if (c->park_acked) park_done(c);
            continue;
        }
        if (s->eof) return mw_pushfail(L, "closed", "closed");
        if (fills >= 16) return mw_sched_requeue(L, t, next_k, 0);
        uint32_t want = EPOLLIN;
        int r = mw_stream_fill(s, 16384, &want);
        fills++;
        if (r == 1 || r == 0) continue;
        if (r == -3) {
            c->fatal = 1;
            return mw_stream_pusherr(L, s, errno);
        }
        mw_buf_release(&s->rbuf, &s->rt->pool);  /* idle: hold no buffer */
        stow_idle(c);
        c->task = t;
        c->reading = 1;
        return mw_sock_wait(L, s, t, MW_ROLE_READ, want, read_deadline(c), next_k, 0);
    }
}

static int resume_step(lua_State *L, h2conn *c, mw_task *t)
{
    c->task = NULL;
    c->reading = 0;
    int why = mw_sched_reason(t);
    if (!c->ngs) return mw_pushfail(L, "closed", "closed");
    if (why == MW_WAKE_TIMEOUT) {
        int64_t now = c->rt->loop.now;
        if (c->handlers == 0 && c->hdr_open == 0 && c->preface_seen && now >= trim_deadline(c)) {
            /* idle for trim_after: the frame buffer is dead once mem_send said 0 (h2mem.h);
             * then back to reading under the other deadlines */
            c->trimmed_for = c->idle_since;
            c->trims++;
            trim_session(c);
            if (c->sock->tp->trim) c->sock->tp->trim(c->sock, 1);
            park(c);
            return next_step(L, c, t);
        }
        if (c->settings_sent && now >= c->settings_sent + (int64_t)(c->t_settings * 1e9)) {
            end_session(c, NGHTTP2_SETTINGS_TIMEOUT);
            return mw_pushfail(L, "SETTINGS not acknowledged", "timeout");
        }
        if (!c->preface_seen || c->hdr_open > 0) {
            end_session(c, NGHTTP2_PROTOCOL_ERROR);
            return mw_pushfail(L, "timeout", "timeout");
        }
        end_session(c, NGHTTP2_NO_ERROR);         /* idle */
        return mw_pushfail(L, "idle", "timeout");
    }
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (c->sock->closed) return mw_pushfail(L, "closed", "closed");
    return next_step(L, c, t);
}

static void unwait_over(mw_task *t)
{
    h2conn *c = t->wait_obj;
    if (c->over_waiter == t) c->over_waiter = NULL;
}

static int over_k(lua_State *L, int status, lua_KContext ctx);

static int over_wait(lua_State *L, h2conn *c, mw_task *t, int nres)
{
    c->over_waiter = t;
    t->wait_obj = c;
    t->unwait = unwait_over;
    return mw_sched_wait(L, t, MW_NO_DEADLINE, over_k, nres);
}

static int over_k(lua_State *L, int status, lua_KContext ctx)
{
    h2conn *c = lua_touserdata(L, 1);
    mw_task *t = c->rt->current;
    (void)status;
    if (mw_sched_reason(t) == MW_WAKE_CANCEL || c->handlers <= 0) return (int)ctx;
    return over_wait(L, c, t, (int)ctx);
}

/* The connection is over: the nres values on top (nil, msg, code) are h2:run's results,
 * once the handlers still running (cancelled here: their pending calls fail) have ended.
 * Events Lua never saw are dropped. A second call (an inner wait's continuation already
 * did this) returns at once. */
static int run_over(lua_State *L, h2conn *c, mw_task *t, int nres)
{
    if (c->ending) return nres;
    c->ending = 1;
    h2stream *st;
    while ((st = pop_event(c)) != NULL) {
        if (!st->seen) {
            st->seen = 1;
            st->handler = 0;
            c->handlers--;
        }
        stream_release(st);
    }
    /* handlers still running are cancelled; any task waiting on a stream (a tunnel's, or
     * one a handler started) wakes to find the connection over (stream_fail: "closed") */
    for (st = c->streams; st; st = st->next) {
        if (st->handler && st->task && !st->tunnel) mw_sched_cancel(st->task);
        wake(&st->reader);
        wake(&st->writer);
    }
    if (c->handlers <= 0) return nres;
    return over_wait(L, c, t, nres);
}

static int next_k(lua_State *L, int status, lua_KContext ctx)
{
    h2conn *c = lua_touserdata(L, 1);
    mw_task *t = c->rt->current;
    (void)status;
    (void)ctx;
    return run_over(L, c, t, resume_step(L, c, t));
}

/* h2:run(fn, ...) -> nil, msg, code when the connection is over and every handler has ended.
 * The connection's task does all its reading here; each request stream's handler runs as
 * fn(..., stream, method, target, path, has_body) in a worker. A stream the client resets
 * while its handler runs cancels the handler's pending call ("stream reset" from the
 * stream's own reads and writes); when the connection ends, the handlers still running are
 * cancelled and waited for. */
static int h2_run(lua_State *L)
{
    h2conn *c = checkconn(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (c->mt_idx) return luaL_error(L, "h2:run: the connection is already served");
    mw_task *t = mw_sock_claim(L, c->sock, MW_ROLE_READ);
    c->nfix = lua_gettop(L) - 2;
    luaL_getmetatable(L, H2S_MT);
    c->mt_idx = lua_gettop(L);
    return run_over(L, c, t, next_step(L, c, t));
}

/* h2:shutdown(graceful) -> true: graceful, a GOAWAY with the last stream id processed
 * (in-flight streams finish, newer ones are refused); else GOAWAY at once and close. */
static int h2_shutdown(lua_State *L)
{
    h2conn *c = checkconn(L);
    int graceful = lua_toboolean(L, 2);
    c->graceful = graceful;
    if (!c->goaway) {
        if (graceful) nghttp2_submit_shutdown_notice(sess(c));
        c->goaway = 1;
        nghttp2_submit_goaway(sess(c), NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(sess(c)), NGHTTP2_NO_ERROR, NULL, 0);
    }
    if (!graceful) c->fatal = 1;
    flush_session(c);
    if (c->task) mw_sched_wake(c->task, MW_WAKE_READY);
    lua_pushboolean(L, 1);
    return 1;
}

/* h2:stats() -> { handlers, requests, glitches, trims (times idle pages went back), trimmed
 * (they did in this idle spell), parks (times the HPACK table was parked), parked (it is now:
 * acknowledged, no request since), hpack_trims (times the HPACK rings' page went back),
 * stows (times an idle spell stowed the session), stowed (it is now) } */
static int h2_stats(lua_State *L)
{
    h2conn *c = checkconn(L);
    lua_createtable(L, 0, 10);
    lua_pushinteger(L, c->handlers);
    lua_setfield(L, -2, "handlers");
    lua_pushinteger(L, c->requests);
    lua_setfield(L, -2, "requests");
    lua_pushinteger(L, c->glitches);
    lua_setfield(L, -2, "glitches");
    lua_pushinteger(L, c->trims);
    lua_setfield(L, -2, "trims");
    lua_pushboolean(L, c->trimmed_for == c->idle_since);
    lua_setfield(L, -2, "trimmed");
    lua_pushinteger(L, c->parks);
    lua_setfield(L, -2, "parks");
    lua_pushboolean(L, c->park_seq && c->settings_acked >= c->park_seq);
    lua_setfield(L, -2, "parked");
    lua_pushinteger(L, c->hpack_trims);
    lua_setfield(L, -2, "hpack_trims");
    lua_pushinteger(L, c->stows);
    lua_setfield(L, -2, "stows");
    lua_pushboolean(L, c->mem.stowed != NULL);
    lua_setfield(L, -2, "stowed");
    return 1;
}

/* h2:idle() -> whether no handler runs (a closing server ends such a connection at once) */
static int h2_idle(lua_State *L)
{
    h2conn *c = checkconn(L);
    lua_pushboolean(L, c->handlers == 0);
    return 1;
}

/* ---- streams ----------------------------------------------------------------------------- */

static h2stream *checkstream(lua_State *L)
{
    h2box *ud = mw_udata_magic(L, 1, sizeof(h2box), offsetof(h2box, magic), H2S_MAGIC);
    if (!ud) ud = luaL_checkudata(L, 1, H2S_MT);
    if (!ud->st) luaL_error(L, "attempt to use a finished HTTP/2 stream");
    return ud->st;
}

static int st_gc(lua_State *L)
{
    h2box *ud = mw_udata_magic(L, 1, sizeof(h2box), offsetof(h2box, magic), H2S_MAGIC);
    if (!ud) ud = luaL_checkudata(L, 1, H2S_MT);
    h2stream *st = ud->st;
    if (!st) return 0;
    ud->st = NULL;
    st->task = NULL;
    /* (st:done gives an unread body's window back; a stream collected without it, its
     * task ended some other way, does it here) */
    mw_buf_free(&st->in, &st->rt->pool);
    consumed(st, st->unconsumed);
    if (st->c && st->handler) {
        st->handler = 0;
        st->c->handlers--;
        if (st->c->handlers == 0 && st->c->over_waiter) mw_sched_wake(st->c->over_waiter, MW_WAKE_READY);
    }
    st->lua_owned = 0;
    if (!st->c) stream_free(st);
    else stream_release(st);
    return 0;
}

/* stream:done(): the handler is over (its slot against max_streams is free again); a stream
 * whose response did not end is reset (INTERNAL_ERROR). */
static int st_done(lua_State *L)
{
    h2stream *st = checkstream(L);
    h2conn *c = st->c;
    if (c && st->handler) {
        st->handler = 0;
        c->handlers--;
        if (c->handlers == 0) c->idle_since = c->rt->loop.now;
        /* a body the handler left unread: its window goes back to the peer (else unread
         * uploads would shrink the connection's window for good), the bytes are dropped */
        mw_buf_free(&st->in, &st->rt->pool);
        consumed(st, st->unconsumed);
        int submitted = 0;
        if (!st->closed && c->ngs) {
            if (!st->responded || !st->out_eof)
                submitted = !nghttp2_submit_rst_stream(sess(c), NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
            else if (!st->body_done && st->data_eof)
                submitted = !nghttp2_submit_rst_stream(sess(c), NGHTTP2_FLAG_NONE, st->id, NGHTTP2_NO_ERROR);
            else if (!st->body_done) {
                st->rst_after_eof = 1;       /* read_body_out sends it after the last DATA */
                submitted = 1;               /* (the connection's task draws that DATA out) */
            }
        }
        st->task = NULL;
        if (c->handlers == 0 && c->over_waiter) {
            mw_sched_wake(c->over_waiter, MW_WAKE_READY);
        } else if (submitted || (c->handlers == 0 && c->graceful)) {
            kick(c);      /* an RST to send, or a draining connection may end now */
        } else if (c->handlers == 0 && c->task && c->reading && c->ngs) {
            /* the last handler ended: the connection's read now waits under the idle
             * deadline (moved without waking the task) */
            mw_sched_set_deadline(c->task, read_deadline(c));
        }
    }
    return 0;
}

/* nil, msg, status: a body that failed, as HttpConn's read_body says it */
static int body_fail(lua_State *L, const char *msg, int status)
{
    lua_pushnil(L);
    lua_pushstring(L, msg);
    lua_pushinteger(L, status);
    return 3;
}

static int stream_fail(lua_State *L, h2stream *st)
{
    if (!st->c || !st->c->ngs || st->c->ending) return mw_pushfail(L, "closed", "closed");
    return mw_pushfail(L, "stream reset", "reset");
}

/* Gives the window of n bytes read back to the peer. */
static void consumed(h2stream *st, size_t n)
{
    h2conn *c = st->c;
    if (n > st->unconsumed) n = st->unconsumed;
    st->unconsumed -= n;
    if (!c || !c->ngs || n == 0) return;
    if (st->in_session) nghttp2_session_consume(sess(c), st->id, n);
    else nghttp2_session_consume_connection(sess(c), n);
    flush_session(c);
}

static int body_k(lua_State *L, int status, lua_KContext ctx);

static void unwait_reader(mw_task *t)
{
    h2stream *st = t->wait_obj;
    if (st->reader == t) st->reader = NULL;
}

/* modes: 0 all, 1 chunk, 2 discard (as HttpConn's read_body) */
static int body_step(lua_State *L, h2stream *st, mw_task *t, int mode)
{
    lua_Integer max = luaL_optinteger(L, 3, -1);
    for (;;) {
        size_t have = mw_buf_len(&st->in);
        if (mode == 1 && have > 0) {
            lua_pushlstring(L, mw_buf_head(&st->in), have);
            mw_buf_consume(&st->in, have);
            mw_buf_release(&st->in, &st->rt->pool);
            consumed(st, have);
            return 1;
        }
        if (mode == 2 && have > 0) {
            mw_buf_consume(&st->in, have);
            mw_buf_release(&st->in, &st->rt->pool);
            consumed(st, have);
            continue;
        }
        if (mode == 0 && max >= 0 && (int64_t)have > max) return body_fail(L, "request body too large", 413);
        if (st->bad) return body_fail(L, "bad request body", 400);
        if (st->body_done) {
            if (mode == 0) {
                lua_pushlstring(L, have ? mw_buf_head(&st->in) : "", have);
                mw_buf_consume(&st->in, have);
                mw_buf_release(&st->in, &st->rt->pool);
                consumed(st, have);
                return 1;
            }
            if (mode == 1) lua_pushnil(L);
            else lua_pushboolean(L, 1);
            return 1;
        }
        if (st->closed || !st->c || st->c->ending) return stream_fail(L, st);
        if (mode == 0 && have > 0) {
            /* a whole body is read at once: give the window back as it arrives, or a body
             * larger than the stream window could never complete */
            consumed(st, st->unconsumed);
        }
        if (st->expect && st->c && st->c->ngs && !st->responded) {
            /* the client waits for 100 Continue before it sends the body */
            st->expect = 0;
            nghttp2_nv nv = { (uint8_t *)":status", (uint8_t *)"100", 7, 3, NGHTTP2_NV_FLAG_NONE };
            nghttp2_submit_headers(sess(st->c), NGHTTP2_FLAG_NONE, st->id, NULL, &nv, 1, NULL);
            flush_session(st->c);
        }
        /* the deadline first: a bad timeout raises, and must find no wait recorded */
        int64_t deadline = mw_sched_deadline(L, st->rt, 4, -1);
        st->reader = t;
        t->wait_obj = st;
        t->unwait = unwait_reader;
        return mw_sched_wait(L, t, deadline, body_k, mode);
    }
}

static int body_k(lua_State *L, int status, lua_KContext ctx)
{
    h2stream *st = ((h2box *)lua_touserdata(L, 1))->st;
    (void)status;
    mw_task *t = st->rt->current;
    int why = mw_sched_reason(t);
    if (why == MW_WAKE_TIMEOUT) return body_fail(L, "request body timeout", 408);
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    return body_step(L, st, t, (int)ctx);
}

/* stream:read_body(mode, max, timeout): as HttpConn's ("all" -> body | nil, msg, status;
 * "chunk" -> next piece | nil at the end; "discard" -> true). Reading gives the flow-control
 * window back, so a handler that never reads holds at most one window. */
static int st_read_body(lua_State *L)
{
    static const char *const modes[] = { "all", "chunk", "discard", NULL };
    h2stream *st = checkstream(L);
    int mode = luaL_checkoption(L, 2, NULL, modes);
    mw_task *t = mw_sched_self(L, st->rt);
    if (st->reader && st->reader != t) return luaL_error(L, "stream already has a reading task");
    if (mode == 0 && st->content_length >= 0 && !lua_isnoneornil(L, 3) && st->content_length > lua_tointeger(L, 3))
        return body_fail(L, "request body too large", 413);
    return body_step(L, st, t, mode);
}

/* stream:state() -> head_done, msg_done, expect, upgrade, content_length, chunked (as
 * HttpConn's, for request.lua) */
static int st_state(lua_State *L)
{
    h2stream *st = checkstream(L);
    lua_pushboolean(L, 1);
    lua_pushboolean(L, st->body_done && mw_buf_len(&st->in) == 0);
    lua_pushboolean(L, 0);    /* 100 Continue is sent by read_body itself */
    lua_pushboolean(L, 0);
    if (st->content_length >= 0) lua_pushinteger(L, st->content_length); else lua_pushnil(L);
    lua_pushboolean(L, 0);
    return 6;
}

static int st_noop(lua_State *L)
{
    checkstream(L);
    return 0;
}

/* The H2Conn's uservalue i (1 the socket, 2 the server). */
static int push_conn_uv(lua_State *L, int i)
{
    checkstream(L);
    lua_getiuservalue(L, 1, 1);
    if (lua_isnil(L, -1)) return 1;
    lua_getiuservalue(L, -1, i);
    return 1;
}

static int st_socket(lua_State *L) { return push_conn_uv(L, 1); }
static int st_server(lua_State *L) { return push_conn_uv(L, 2); }

/* stream:pseudo(name) -> the request's pseudo-header (":scheme", ":authority", ...) or nil */
static int st_pseudo(lua_State *L)
{
    h2stream *st = checkstream(L);
    const char *v = fields_get(&st->head, luaL_checkstring(L, 2));
    if (v) lua_pushstring(L, v); else lua_pushnil(L);
    return 1;
}

static int st_id(lua_State *L)
{
    lua_pushinteger(L, checkstream(L)->id);
    return 1;
}

/* Pushes a headers table from a packed list: lower-case names (HTTP/2's), repeated fields
 * kept in req._multi (as HTTP/1.1's), cookie crumbs joined with "; " (RFC 9113 §8.2.3),
 * :authority as host when there is no Host. */
static void push_fields(lua_State *L, const fields *f, int reqidx, int request)
{
    lua_createtable(L, 0, f->n);
    int hidx = lua_gettop(L);
    size_t pos = 0, nl, vl;
    const char *n, *v;
    luaL_Buffer cookie;
    int ncookie = 0;
    while (fields_next(f, &pos, &n, &nl, &v, &vl)) {
        if (n[0] == ':') {
            if (request && strcmp(n, ":authority") == 0 && !fields_get(f, "host")) {
                lua_pushlstring(L, v, vl);
                lua_setfield(L, hidx, "host");
            }
            continue;
        }
        if (request && strcmp(n, "cookie") == 0) {
            if (ncookie++ == 0) luaL_buffinit(L, &cookie);
            else luaL_addstring(&cookie, "; ");
            luaL_addlstring(&cookie, v, vl);
            continue;
        }
        lua_pushlstring(L, n, nl);
        int kidx = lua_gettop(L);
        lua_pushvalue(L, kidx);
        if (lua_rawget(L, hidx) == LUA_TNIL) {
            lua_pop(L, 1);
            lua_pushlstring(L, v, vl);
            lua_rawset(L, hidx);
            continue;
        }
        /* repeated: every value in req._multi[name] (a trailer list keeps the first) */
        int oldidx = lua_gettop(L);
        if (reqidx) mw_http_add_multi(L, reqidx, kidx, oldidx, v, vl);
        lua_settop(L, kidx - 1);
    }
    if (ncookie > 0) {
        luaL_pushresult(&cookie);
        lua_setfield(L, hidx, "cookie");
    }
}

/* stream:headers_of(req) -> the request's header table (request.lua's lazy `headers`) */
static int st_headers_of(lua_State *L)
{
    h2stream *st = checkstream(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    push_fields(L, &st->head, 2, 1);
    return 1;
}

/* stream:trailers() -> the request's trailer fields once the body ended, or nil */
static int st_trailers(lua_State *L)
{
    h2stream *st = checkstream(L);
    if (!st->body_done || st->trailers.n == 0) {
        lua_pushnil(L);
        return 1;
    }
    push_fields(L, &st->trailers, 0, 0);
    return 1;
}

/* Writes the decimal digits of v (>= 0) into buf (room for 20) and returns their count. */
static size_t fmt_uint(char *buf, uint64_t v)
{
    char tmp[20];
    size_t n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    for (size_t i = 0; i < n; i++) buf[i] = tmp[n - 1 - i];
    return n;
}

static const char *cached_date(h2conn *c)
{
    time_t now = time(NULL);
    if (now != c->date_sec) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(c->date, sizeof c->date, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        c->date_sec = now;
    }
    return c->date;
}

/* stream:respond(status, res, nh, hbase, body, eof, server_name, content_length) -> true |
 * nil, msg, code. Submits the head (and with `body` a first part of the body; eof: the body
 * ends there). Header names are lower-cased; connection-specific fields are dropped. */
/* The response head of st: status, the nh name/value pairs of the table at hidx from slot
 * hbase, Server (when server), Date, Content-Length (clen >= 0, unless the handler set
 * one); then body (NULL: none yet), eof: the body is complete. Pushes true, or nil, err,
 * code. res:send's C path (response_send) and stream:respond both come here. */
static int respond_core(lua_State *L, h2stream *st, int status, int hidx, int nh, int hbase,
                        const char *body, size_t blen, int eof, const char *server, lua_Integer clen,
                        int fast)
{
    h2conn *c = st->c;
    if (st->responded && status >= 200) return luaL_error(L, "response head already sent");
    /* (ending: the connection is over, as st:write says; Server:close cut it off after its
     * grace period: a head submitted now would never go out) */
    if (!c || !c->ngs || c->ending || st->closed) return stream_fail(L, st);
    int cap = nh + 4;
    size_t arena = 0;
    for (int i = 0; i < nh; i++) {
        size_t kl;
        lua_rawgeti(L, hidx, hbase + 2 * i);
        lua_tolstring(L, -1, &kl);
        arena += kl;
        lua_pop(L, 1);
    }
    /* the list and the lower-cased names: on the C stack for a usual head, else in a
     * userdata (either way a raise leaks nothing) */
    nghttp2_nv nv_small[24];
    char arena_small[1024];
    nvlist list, *l = &list;
    if (cap <= 24 && arena <= sizeof arena_small) {
        l->nv = nv_small;
        l->arena = arena_small;
        lua_pushnil(L);
    } else {
        char *mem = lua_newuserdatauv(L, (size_t)cap * sizeof(nghttp2_nv) + arena, 0);
        l->nv = (nghttp2_nv *)mem;
        l->arena = (char *)(l->nv + cap);
    }
    int lidx = lua_gettop(L);
    l->n = 0;
    l->cap = cap;
    l->used = 0;
    l->size = arena;
    char st_buf[4];
    size_t sl = fmt_uint(st_buf, (uint64_t)status);   /* 3 digits: checked above */
    nv_add(l, ":status", 7, st_buf, sl, NV_STATIC);
    for (int i = 0; i < nh; i++) {
        size_t kl, vl;
        lua_rawgeti(L, hidx, hbase + 2 * i);
        lua_rawgeti(L, hidx, hbase + 2 * i + 1);
        const char *k = lua_tolstring(L, -2, &kl), *v = lua_tolstring(L, -1, &vl);
        if (!k || !v) return luaL_error(L, "bad header list");
        char lk[24];
        size_t m = kl < sizeof lk ? kl : sizeof lk;
        for (size_t j = 0; j < m; j++) lk[j] = (char)((k[j] >= 'A' && k[j] <= 'Z') ? k[j] + 32 : k[j]);
        if (kl < sizeof lk && h2_conn_specific(lk, kl)) { lua_pop(L, 2); continue; }
        if (kl == 14 && memcmp(lk, "content-length", 14) == 0) {
            /* the handler's own: res:send's C path leaves it to h2.lua's, which holds the
             * body to it (nothing was submitted yet) */
            if (fast) {
                lua_settop(L, lidx - 1);
                return -1;
            }
            clen = -2;
        }
        nv_add(l, k, kl, v, vl, NV_LOWER);
        /* the values stay referenced by the response table until submit returns */
        lua_pop(L, 2);
    }
    if (server && *server) nv_add(l, "server", 6, server, strlen(server), NV_STATIC);
    if (status >= 200) {
        const char *date = cached_date(c);
        nv_add(l, "date", 4, date, strlen(date), NV_STATIC);
    }
    char clbuf[24];
    if (clen >= 0 && status >= 200 && status != 204 && status != 304) {
        nv_add(l, "content-length", 14, clbuf, fmt_uint(clbuf, (uint64_t)clen), NV_STATIC);
    }
    if (h2_nv_bound(l->nv, (size_t)l->n) > H2_MAX_SEND_HEAD) {
        lua_settop(L, lidx - 1);
        return mw_pushfail(L, "response head too large for HTTP/2 (64 KiB at most)", "toolarge");
    }
    if (status < 200) {
        /* 1xx (103 Early Hints): a HEADERS frame that does not end the stream */
        int rv = nghttp2_submit_headers(sess(c), NGHTTP2_FLAG_NONE, st->id, NULL, l->nv, (size_t)l->n, NULL);
        lua_settop(L, lidx - 1);
        if (rv != 0) return mw_pushfail(L, nghttp2_strerror(rv), "http2");
        flush_session(c);
        lua_pushboolean(L, 1);
        return 1;
    }
    if (body && blen) {
        size_t avail;
        char *p = mw_buf_reserve(&st->out, &st->rt->pool, blen, &avail);
        if (!p) return luaL_error(L, "not enough memory");
        memcpy(p, body, blen);
        mw_buf_commit(&st->out, blen);
    }
    st->out_eof = eof ? 1 : 0;
    st->responded = 1;
    nghttp2_data_provider prd;
    prd.source.ptr = st;
    prd.read_callback = read_body_out;
    int bodiless = eof && mw_buf_len(&st->out) == 0 && st->trout.n == 0;
    st->data_eof = bodiless;         /* END_STREAM on the HEADERS itself */
    int rv = nghttp2_submit_response(sess(c), st->id, l->nv, (size_t)l->n, bodiless ? NULL : &prd);
    lua_settop(L, lidx - 1);
    if (rv != 0) return mw_pushfail(L, nghttp2_strerror(rv), "http2");
    /* the only handler running: out now (waking the connection's task would cost more);
     * several: the connection's task draws them all out in one pass */
    if (c->handlers <= 1) flush_session(c);
    else kick(c);
    lua_pushboolean(L, 1);
    return 1;
}

/* stream:respond(status, headers, nh, hbase [, body [, eof [, server [, content_length]]]])
 * -> true | nil, err, code */
static int st_respond(lua_State *L)
{
    h2stream *st = checkstream(L);
    int status = (int)luaL_checkinteger(L, 2);
    luaL_argcheck(L, status >= 100 && status <= 999, 2, "status code expected");
    luaL_checktype(L, 3, LUA_TTABLE);
    int nh = (int)luaL_checkinteger(L, 4);
    int hbase = (int)luaL_checkinteger(L, 5);
    size_t blen = 0;
    const char *body = luaL_optlstring(L, 6, NULL, &blen);
    int eof = lua_toboolean(L, 7);
    const char *server = luaL_optstring(L, 8, NULL);
    lua_Integer clen = luaL_optinteger(L, 9, -1);
    return respond_core(L, st, status, 3, nh, hbase, body, blen, eof, server, clen, 0);
}

/* The response's slots (response.lua), and what the request's slot 6 holds */
enum { R2_SRV = 1, R2_REQ = 2, R2_SOCK = 3, R2_NH = 4, R2_FIN = 5, R2_BYTES = 6, R2_STATUS = 7,
       R2_CLOSE = 8, R2_HBASE = 10, RQ_METHOD = 6 };
/* upvalues of res:send's C path: the Lua implementation, then keys and a constant */
enum { U2_SLOW = 1, U2_SENT, U2_TRAILERS, U2_GZIP_FROM, U2_SERVER_NAME, U2_HEAD, U2_CONNECT, U2_COUNT = U2_CONNECT };

/* res:send(body) for a response over HTTP/2 (h2.lua's R2): a string body, the head not
 * sent, no trailers, no compression to decide, a status with a body, not HEAD: done here,
 * as h2.lua's send_raw does it; anything else goes to the Lua implementation. */
static int response_send(lua_State *L)
{
    int top0 = lua_gettop(L);
    if (top0 != 2 || lua_type(L, 1) != LUA_TTABLE || lua_type(L, 2) != LUA_TSTRING) return mw_call_upvalue(L, U2_SLOW, top0);
    size_t blen;
    const char *body = lua_tolstring(L, 2, &blen);
    if (mw_rawget_upvalue(L, 1, U2_SENT) != LUA_TBOOLEAN || lua_toboolean(L, -1)) return mw_call_upvalue(L, U2_SLOW, top0);
    if (mw_rawget_upvalue(L, 1, U2_TRAILERS) != LUA_TNIL) return mw_call_upvalue(L, U2_SLOW, top0);
    if (lua_rawgeti(L, 1, R2_SRV) != LUA_TTABLE) return mw_call_upvalue(L, U2_SLOW, top0);
    int srv = lua_gettop(L);
    int isnum;
    mw_rawget_upvalue(L, srv, U2_GZIP_FROM);
    lua_Number gz = lua_tonumberx(L, -1, &isnum);
    if (!isnum || (lua_Number)blen >= gz) return mw_call_upvalue(L, U2_SLOW, top0);
    int tn = mw_rawget_upvalue(L, srv, U2_SERVER_NAME);
    if (tn != LUA_TSTRING && tn != LUA_TNIL && !(tn == LUA_TBOOLEAN && !lua_toboolean(L, -1))) return mw_call_upvalue(L, U2_SLOW, top0);
    const char *server = tn == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    if (lua_rawgeti(L, 1, R2_REQ) != LUA_TTABLE) return mw_call_upvalue(L, U2_SLOW, top0);
    lua_rawgeti(L, -1, RQ_METHOD);
    lua_pushvalue(L, lua_upvalueindex(U2_HEAD));
    if (lua_rawequal(L, -1, -2)) return mw_call_upvalue(L, U2_SLOW, top0);
    int connect = lua_rawequal(L, -2, lua_upvalueindex(U2_CONNECT));
    lua_rawgeti(L, 1, R2_STATUS);
    lua_Integer status = lua_tointegerx(L, -1, &isnum);
    /* (a response without a body: h2.lua's send, which drops a handler's content-length) */
    if (!isnum || status > 999 || mw_http_bodyless(status, connect)) return mw_call_upvalue(L, U2_SLOW, top0);
    lua_rawgeti(L, 1, R2_NH);
    lua_Integer nh = lua_tointegerx(L, -1, &isnum);
    if (!isnum || nh < 0) return mw_call_upvalue(L, U2_SLOW, top0);
    lua_rawgeti(L, 1, R2_SOCK);
    h2box *ud = mw_udata_magic(L, -1, sizeof(h2box), offsetof(h2box, magic), H2S_MAGIC);
    if (!ud || !ud->st) return mw_call_upvalue(L, U2_SLOW, top0);
    /* as send_raw: the head and the body at once, then sent, finished, the bytes */
    int base = lua_gettop(L);
    int n = respond_core(L, ud->st, (int)status, 1, (int)nh, R2_HBASE, body, blen, 1, server, (lua_Integer)blen, 1);
    if (n < 0) {                     /* a content-length of the handler's: h2.lua's send */
        lua_settop(L, top0);
        return mw_call_upvalue(L, U2_SLOW, top0);
    }
    lua_pushvalue(L, lua_upvalueindex(U2_SENT));
    lua_pushboolean(L, 1);
    lua_rawset(L, 1);
    lua_pushboolean(L, 1);
    lua_rawseti(L, 1, R2_FIN);
    lua_pushinteger(L, (lua_Integer)blen);
    lua_rawseti(L, 1, R2_BYTES);
    if (lua_isnil(L, base + 1)) {
        lua_pushboolean(L, 1);
        lua_rawseti(L, 1, R2_CLOSE);
    }
    return n;
}

/* h2_response_send(send_lua) -> res:send with its common case in C */
static int l_h2_response_send(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_settop(L, 1);
    lua_pushliteral(L, "sent");
    lua_pushliteral(L, "_trailers");
    lua_pushliteral(L, "_gzip_from");
    lua_pushliteral(L, "server_name");
    lua_pushliteral(L, "HEAD");
    lua_pushliteral(L, "CONNECT");
    lua_pushcclosure(L, response_send, U2_COUNT);
    return 1;
}

static int write_k(lua_State *L, int status, lua_KContext ctx);

static void unwait_writer(mw_task *t)
{
    h2stream *st = t->wait_obj;
    if (st->writer == t) st->writer = NULL;
}

static int write_wait(lua_State *L, h2stream *st)
{
    for (;;) {
        if (st->closed || !st->c || !st->c->ngs || st->c->ending) return stream_fail(L, st);
        if (mw_buf_len(&st->out) < st->c->out_hwm) {
            lua_pushboolean(L, 1);
            return 1;
        }
        mw_task *t = mw_sched_self(L, st->rt);
        st->writer = t;
        t->wait_obj = st;
        t->unwait = unwait_writer;
        return mw_sched_wait(L, t, mw_sched_after(st->c->rt, st->c->t_write), write_k, 0);
    }
}

static int write_k(lua_State *L, int status, lua_KContext ctx)
{
    h2stream *st = ((h2box *)lua_touserdata(L, 1))->st;
    (void)status;
    (void)ctx;
    int why = mw_sched_reason(st->rt->current);
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    return write_wait(L, st);
}

/* stream:write(data [, eof]) -> true | nil, msg, code: queues body bytes (after respond),
 * waits while the stream holds more than out_hwm unsent (the peer reads slowly or its
 * window is shut: the stream stalls, never the connection). */
static int st_write(lua_State *L)
{
    h2stream *st = checkstream(L);
    size_t len;
    const char *p = luaL_checklstring(L, 2, &len);
    int eof = lua_toboolean(L, 3);
    if (!st->responded) return luaL_error(L, "write before the response head");
    if (st->out_eof) return luaL_error(L, "response already finished");
    if (st->closed || !st->c || !st->c->ngs || st->c->ending) return stream_fail(L, st);
    if (len) {
        size_t avail;
        char *w = mw_buf_reserve(&st->out, &st->rt->pool, len, &avail);
        if (!w) return luaL_error(L, "not enough memory");
        memcpy(w, p, len);
        mw_buf_commit(&st->out, len);
    }
    if (eof) st->out_eof = 1;
    if (st->deferred) {
        st->deferred = 0;
        nghttp2_session_resume_data(sess(st->c), st->id);
    }
    flush_session(st->c);
    if (eof) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return write_wait(L, st);
}

/* Appends the n name/value pairs of the flat table at idx (names lower-cased) to f; raises
 * on a bad entry or memory exhaustion. Trailers the server or the client will send. */
void mw_h2_fields_from(lua_State *L, int idx, int n, fields *f)
{
    for (int i = 1; i <= n; i++) {
        size_t kl, vl;
        lua_rawgeti(L, idx, 2 * i - 1);
        lua_rawgeti(L, idx, 2 * i);
        const char *k = luaL_checklstring(L, -2, &kl), *v = luaL_checklstring(L, -1, &vl);
        char lk[256];
        if (kl >= sizeof lk) luaL_error(L, "trailer name too long");
        for (size_t j = 0; j < kl; j++) lk[j] = (char)((k[j] >= 'A' && k[j] <= 'Z') ? k[j] + 32 : k[j]);
        if (fields_add(f, (const uint8_t *)lk, kl, (const uint8_t *)v, vl) < 0) luaL_error(L, "not enough memory");
        lua_pop(L, 2);
    }
}

/* stream:set_trailers(list, n) -> true | nil, err, "toolarge": trailer fields sent after
 * the body (before the write or finish that ends it) */
static int st_set_trailers(lua_State *L)
{
    h2stream *st = checkstream(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    return mw_h2_set_trailers(L, 2, (int)luaL_checkinteger(L, 3), &st->trout);
}

int mw_h2_set_trailers(lua_State *L, int idx, int n, fields *f)
{
    mw_h2_fields_from(L, idx, n, f);
    const char *why = h2_trailers_unfit(f);
    if (why) {
        fields_free(f);
        return mw_pushfail(L, why, "toolarge");
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* stream:reset([code]) : RST_STREAM (default CANCEL) */
static int st_reset(lua_State *L)
{
    h2stream *st = checkstream(L);
    uint32_t code = (uint32_t)luaL_optinteger(L, 2, NGHTTP2_CANCEL);
    if (st->c && st->c->ngs && !st->closed) {
        nghttp2_submit_rst_stream(sess(st->c), NGHTTP2_FLAG_NONE, st->id, code);
        flush_session(st->c);
    }
    return 0;
}

/* stream:tunnel(): the stream carries a WebSocket from now on (see h2stream.tunnel) */
static int st_tunnel(lua_State *L)
{
    h2stream *st = checkstream(L);
    st->tunnel = 1;
    return 0;
}

/* stream:closed() -> whether the stream is over (reset, or the connection gone) */
static int st_closed(lua_State *L)
{
    h2stream *st = checkstream(L);
    lua_pushboolean(L, st->closed || !st->c || !st->c->ngs);
    return 1;
}

/* core.h2_preface(sock [, timeout]) -> true when the buffered input starts with the HTTP/2
 * client preface, false when it cannot, nil, msg, code on an error. Reads until it knows;
 * consumes nothing. */
static const char PREFACE[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static int preface_k(lua_State *L, int status, lua_KContext ctx);

static int preface_step(lua_State *L, mw_sock *s, mw_task *t)
{
    for (;;) {
        size_t len = mw_buf_len(&s->rbuf);
        size_t m = len < 24 ? len : 24;
        if (m > 0 && memcmp(mw_buf_head(&s->rbuf), PREFACE, m) != 0) {
            lua_pushboolean(L, 0);
            return 1;
        }
        if (len >= 24) {
            lua_pushboolean(L, 1);
            return 1;
        }
        if (s->eof) {
            lua_pushboolean(L, 0);
            return 1;
        }
        uint32_t want = EPOLLIN;
        int r = mw_stream_fill(s, 16384, &want);
        if (r == 1 || r == 0) continue;
        if (r == -3) return mw_stream_pusherr(L, s, errno);
        return mw_sock_wait(L, s, t, MW_ROLE_READ, want, s->rdeadline, preface_k, 0);
    }
}

static int preface_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_sock *s = lua_touserdata(L, 1);
    mw_task *t = s->rt->current;
    (void)status;
    (void)ctx;
    int why = mw_sched_reason(t);
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (s->closed) return mw_pushfail(L, "closed", "closed");
    return preface_step(L, s, t);
}

static int l_h2_preface(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    int64_t d = mw_sched_deadline(L, s->rt, 2, s->timeout);
    mw_task *t = mw_sock_claim(L, s, MW_ROLE_READ);
    s->rdeadline = d;
    if (mw_buf_len(&s->rbuf) == 0 && s->eof) {
        lua_pushboolean(L, 0);
        return 1;
    }
    return preface_step(L, s, t);
}

void mw_h2_open(lua_State *L)
{
    static const luaL_Reg conn_m[] = {
        { "run", h2_run }, { "shutdown", h2_shutdown }, { "stats", h2_stats }, { "idle", h2_idle },
        { NULL, NULL }
    };
    static const luaL_Reg st_m[] = {
        { "read_body", st_read_body }, { "state", st_state }, { "clear_expect", st_noop },
        { "socket", st_socket }, { "server", st_server }, { "headers_of", st_headers_of },
        { "trailers", st_trailers }, { "respond", st_respond }, { "write", st_write },
        { "set_trailers", st_set_trailers }, { "reset", st_reset }, { "done", st_done },
        { "closed", st_closed }, { "tunnel", st_tunnel }, { "id", st_id }, { "pseudo", st_pseudo }, { NULL, NULL }
    };
    luaL_newmetatable(L, H2_MT);
    luaL_newlib(L, conn_m);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, h2_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, h2_gc);
    lua_setfield(L, -2, "__close");
    lua_pop(L, 1);
    luaL_newmetatable(L, H2S_MT);
    luaL_newlib(L, st_m);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, st_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_h2_server);
    lua_setfield(L, -2, "h2_server");
    lua_pushcfunction(L, l_h2_preface);
    lua_setfield(L, -2, "h2_preface");
    lua_pushcfunction(L, l_h2_response_send);
    lua_setfield(L, -2, "h2_response_send");
}
