/* redis: the Lua side of RESP (resp.c): commands encoded from Lua arguments, replies built
 * as Lua values, a socket-free decoder (tests, fuzzing), and the connection that many tasks
 * share. A call writes its command into the socket's output buffer (flushed once before the
 * loop polls, so every command of a loop turn goes out in one write), takes the next reply
 * slot of a FIFO ring and parks; one reader task per connection, started while replies are
 * owed, parses every reply a read brings and hands each to the task of the next slot. A task
 * that gives up (timeout, cancel) leaves its slot, whose reply is then read and dropped.
 * RESP3 pushes never take a slot: they go to a push queue. */
#define _GNU_SOURCE
#include "redis.h"
#include "stream.h"
#include "mwlua.h"
#include "resp.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <openssl/sha.h>

#define RC_MT "moonwire.RespConn"
#define DEC_MT "moonwire.RespDecoder"
#define DEFAULT_MAX_BULK (512u * 1024 * 1024)
#define DEFAULT_MAX_DEPTH 32
#define OUT_FLUSH (256 * 1024)      /* gathered output above this is written at once */

/* ---- encoding --------------------------------------------------------------------------- */

/* Checks the command at L[first..last]: a name, then strings and numbers (raises naming
 * the argument: #1 is the first after the name, as in r:set(key, value)). */
static void check_args(lua_State *L, int first, int last, const char *fname, int level)
{
    const char *bad = NULL;
    int at = 0;
    if (last < first || lua_type(L, first) != LUA_TSTRING) {
        bad = luaL_typename(L, first);
    } else {
        for (int i = first + 1; i <= last && !bad; i++) {
            int t = lua_type(L, i);
            if (t != LUA_TSTRING && t != LUA_TNUMBER) { bad = luaL_typename(L, i); at = i - first; }
        }
    }
    if (!bad) return;
    luaL_where(L, level);    /* the caller's line: level 2 when a Lua method wrapped the call */
    if (at) lua_pushfstring(L, "bad argument #%d to '%s' (string or number expected, got %s)", at, fname, bad);
    else lua_pushfstring(L, "bad command name to '%s' (string expected, got %s)", fname, bad);
    lua_concat(L, 2);
    lua_error(L);
}

/* Where encoded bytes go: two pieces at a time (the chunk so far, and a long argument). */
typedef int (*sink_fn)(void *ud, const char *a, size_t an, const char *b, size_t bn);

typedef struct {
    char buf[2048];
    size_t n;
    sink_fn sink;
    void *ud;
} encoder;

static int enc_flush(encoder *e, const char *b, size_t bn)
{
    int r = (e->n || bn) ? e->sink(e->ud, e->buf, e->n, b, bn) : 0;
    e->n = 0;
    return r;
}

static int enc_head(encoder *e, char type, size_t n)
{
    if (e->n + 32 > sizeof e->buf && enc_flush(e, NULL, 0) < 0) return -1;
    e->n += (size_t)snprintf(e->buf + e->n, 32, "%c%zu\r\n", type, n);
    return 0;
}

static int enc_bulk(encoder *e, const char *p, size_t len)
{
    if (enc_head(e, '$', len) < 0) return -1;
    if (len > 512) {
        if (enc_flush(e, p, len) < 0) return -1;
    } else {
        if (e->n + len + 2 > sizeof e->buf && enc_flush(e, NULL, 0) < 0) return -1;
        memcpy(e->buf + e->n, p, len);
        e->n += len;
    }
    memcpy(e->buf + e->n, "\r\n", 2);
    e->n += 2;
    return 0;
}

/* Encodes L[first..last] (checked) as an array of bulk strings. */
static int encode(lua_State *L, encoder *e, int first, int last)
{
    if (enc_head(e, '*', (size_t)(last - first + 1)) < 0) return -1;
    for (int i = first; i <= last; i++) {
        size_t len;
        const char *p;
        char num[64];
        if (lua_type(L, i) == LUA_TSTRING) {
            p = lua_tolstring(L, i, &len);
        } else if (lua_isinteger(L, i)) {
            len = (size_t)snprintf(num, sizeof num, LUA_INTEGER_FMT, lua_tointeger(L, i));
            p = num;
        } else {
            double d = lua_tonumber(L, i);
            if (isinf(d)) len = (size_t)snprintf(num, sizeof num, "%s", d > 0 ? "inf" : "-inf");
            else {
                for (int prec = 15; prec <= 17; prec++) {   /* the shortest that reads back */
                    len = (size_t)snprintf(num, sizeof num, "%.*g", prec, d);
                    if (strtod(num, NULL) == d) break;
                }
            }
            p = num;
        }
        if (enc_bulk(e, p, len) < 0) return -1;
    }
    return 0;
}

static int sink_luabuf(void *ud, const char *a, size_t an, const char *b, size_t bn)
{
    luaL_addlstring(ud, a, an);
    if (bn) luaL_addlstring(ud, b, bn);
    return 0;
}

/* resp_encode(cmd, ...) -> the command as RESP bytes */
static int l_encode(lua_State *L)
{
    int top = lua_gettop(L);
    check_args(L, 1, top, "encode", 1);
    luaL_Buffer b;
    encoder e;
    e.n = 0;
    e.sink = sink_luabuf;
    e.ud = &b;
    luaL_buffinit(L, &b);
    encode(L, &e, 1, top);
    enc_flush(&e, NULL, 0);
    luaL_pushresult(&b);
    return 1;
}

/* ---- building Lua values --------------------------------------------------------------- */

typedef struct {
    lua_State *L;
    int errmt;            /* stack index of the error metatable */
    int depth;
    int top_type;         /* the reply's type (the first value's) */
    struct { int idx; lua_Integer i; int map, key; } f[MW_RESP_DEPTH_MAX];
} builder;

/* Pushes an error object: setmetatable({ message = msg }, RedisError) */
static void push_errobj(lua_State *L, int errmt, const char *p, size_t n)
{
    lua_createtable(L, 0, 1);
    lua_pushlstring(L, p, n);
    lua_setfield(L, -2, "message");
    lua_pushvalue(L, errmt);
    lua_setmetatable(L, -2);
}

/* The value on top joins the aggregate being built. */
static void attach(builder *b)
{
    lua_State *L = b->L;
    if (b->depth == 0) return;
    int d = b->depth - 1;
    if (!b->f[d].map) {
        lua_rawseti(L, b->f[d].idx, ++b->f[d].i);
    } else if (!b->f[d].key) {
        /* a key that cannot index a table: null and NaN become strings */
        if (lua_type(L, -1) == LUA_TLIGHTUSERDATA) { lua_pop(L, 1); lua_pushliteral(L, "null"); }
        else if (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) != lua_tonumber(L, -1)) {
            lua_pop(L, 1);
            lua_pushliteral(L, "nan");
        }
        b->f[d].key = 1;
    } else {
        lua_rawset(L, b->f[d].idx);
        b->f[d].key = 0;
    }
}

static int build_visit(void *ud, const mw_resp_item *it)
{
    builder *b = ud;
    lua_State *L = b->L;
    if (b->top_type == 0) b->top_type = it->type;
    switch (it->type) {
    case MW_RESP_SIMPLE: case MW_RESP_BULK: case MW_RESP_VERBATIM: case MW_RESP_BIGNUM:
        lua_pushlstring(L, it->p, it->len);
        break;
    case MW_RESP_ERROR: case MW_RESP_BLOBERR:
        if (b->depth == 0) lua_pushlstring(L, it->p, it->len);   /* the caller decides */
        else push_errobj(L, b->errmt, it->p, it->len);
        break;
    case MW_RESP_INTEGER:
        lua_pushinteger(L, (lua_Integer)it->n);
        break;
    case MW_RESP_NULL:
        lua_pushlightuserdata(L, NULL);
        break;
    case MW_RESP_BOOL:
        lua_pushboolean(L, (int)it->n);
        break;
    case MW_RESP_DOUBLE:
        lua_pushnumber(L, (lua_Number)it->d);
        break;
    case MW_RESP_END:
        b->depth--;
        break;
    default: {  /* aggregates */
        int map = it->type == MW_RESP_MAP;
        if (!lua_checkstack(L, 4)) luaL_error(L, "stack overflow");
        lua_createtable(L, map ? 0 : (int)it->n, map ? (int)it->n : 0);
        int d = b->depth++;
        b->f[d].idx = lua_gettop(L);
        b->f[d].i = 0;
        b->f[d].map = map;
        b->f[d].key = 0;
        return 0;
    }
    }
    attach(b);
    return 0;
}

/* Pushes the reply at p (n bytes, whole); returns its type. A top-level error is pushed as
 * its message (a string): the caller makes it a failure or an error object. */
static int build(lua_State *L, int errmt, const char *p, size_t n)
{
    builder b;
    b.L = L;
    b.errmt = errmt;
    b.depth = 0;
    b.top_type = 0;
    if (!lua_checkstack(L, 8)) luaL_error(L, "stack overflow");
    mw_resp_walk(p, n, build_visit, &b);
    return b.top_type;
}

static int is_error_type(int t) { return t == MW_RESP_ERROR || t == MW_RESP_BLOBERR; }

/* ---- the decoder (no socket) ------------------------------------------------------------ */

typedef struct {
    mw_buf in;
    mw_resp r;
} decoder;

static void opt_limits(lua_State *L, int idx, size_t *max_bulk, int *max_depth)
{
    *max_bulk = DEFAULT_MAX_BULK;
    *max_depth = DEFAULT_MAX_DEPTH;
    if (lua_type(L, idx) != LUA_TTABLE) return;
    if (lua_getfield(L, idx, "max_bulk") != LUA_TNIL) {
        lua_Integer v = lua_tointeger(L, -1);
        if (v <= 0) luaL_error(L, "bad option 'max_bulk' (positive integer expected)");
        *max_bulk = (size_t)v;
    }
    if (lua_getfield(L, idx, "max_depth") != LUA_TNIL) {
        lua_Integer v = lua_tointeger(L, -1);
        if (v <= 0 || v > MW_RESP_DEPTH_MAX)
            luaL_error(L, "bad option 'max_depth' (1..%d expected)", MW_RESP_DEPTH_MAX);
        *max_depth = (int)v;
    }
    lua_pop(L, 2);
}

/* resp_decoder([{ max_bulk, max_depth }]) -> decoder */
static int l_decoder(lua_State *L)
{
    size_t mb;
    int md;
    opt_limits(L, 1, &mb, &md);
    decoder *d = lua_newuserdatauv(L, sizeof *d, 0);
    memset(&d->in, 0, sizeof d->in);
    mw_resp_init(&d->r, mb, md);
    luaL_setmetatable(L, DEC_MT);
    return 1;
}

/* dec:feed(bytes) -> dec */
static int dec_feed(lua_State *L)
{
    decoder *d = luaL_checkudata(L, 1, DEC_MT);
    size_t n, avail;
    const char *p = luaL_checklstring(L, 2, &n);
    char *w = mw_buf_reserve(&d->in, NULL, n, &avail);
    if (!w) return luaL_error(L, "not enough memory");
    memcpy(w, p, n);
    mw_buf_commit(&d->in, n);
    lua_settop(L, 1);
    return 1;
}

/* dec:next() -> value, type (a one-character string: "+", "*", ">", ...; errors are error
 * objects) | nil (more bytes needed) | nil, message, "protocol" */
static int dec_next(lua_State *L)
{
    decoder *d = luaL_checkudata(L, 1, DEC_MT);
    const char *err;
    int64_t k = mw_resp_scan(&d->r, mw_buf_head(&d->in), mw_buf_len(&d->in), &err);
    if (k < 0) {
        mw_buf_consume(&d->in, mw_buf_len(&d->in));
        return mw_pushfail(L, err, "protocol");
    }
    if (k == 0) return 0;
    int t = build(L, lua_upvalueindex(1), mw_buf_head(&d->in), (size_t)k);
    if (is_error_type(t)) {
        size_t n;
        const char *m = lua_tolstring(L, -1, &n);
        push_errobj(L, lua_upvalueindex(1), m, n);
    }
    mw_buf_consume(&d->in, (size_t)k);
    char c = (char)(t == MW_RESP_NULL ? '_' : t);
    lua_pushlstring(L, &c, 1);
    return 2;
}

/* dec:buffered() -> bytes fed and not yet returned as values */
static int dec_buffered(lua_State *L)
{
    decoder *d = luaL_checkudata(L, 1, DEC_MT);
    lua_pushinteger(L, (lua_Integer)mw_buf_len(&d->in));
    return 1;
}

static int dec_gc(lua_State *L)
{
    decoder *d = luaL_checkudata(L, 1, DEC_MT);
    mw_buf_free(&d->in, NULL);
    return 0;
}

/* ---- the connection --------------------------------------------------------------------- */

typedef struct {
    mw_task *t;            /* the waiting task; NULL once it gave up */
    uint32_t left;         /* replies this slot still takes (a batch takes several) */
    uint32_t batch;        /* the task collects into a table at its stack index 2 */
    uint8_t ack;           /* a command written by rc_send: its confirmations come as pushes
                            * of kind ACK_KINDS[ack] (left of them), an error as a reply */
    uint8_t marker;        /* ... an UNSUBSCRIBE of everything, followed by a PING: the
                            * PING's reply ends the slot (see rc_send) */
    uint8_t answered;      /* ... (marker) a confirmation or the command's error came */
} slot;

/* the commands rc_send expects confirmations of (the push kinds are the same words) */
static const char *const ACK_KINDS[] = { NULL, "subscribe", "psubscribe", "ssubscribe",
                                         "unsubscribe", "punsubscribe", "sunsubscribe" };

typedef struct rconn {
    uint64_t magic;
    mw_sock *s;            /* user value 1 */
    mw_rt *rt;
    slot *ring;            /* replies owed, in order: sequence numbers head..tail-1 */
    uint64_t cap, head, tail;
    mw_task *reader;       /* the reader task, while there is one */
    unsigned reader_run;   /* rt->runs when reader was set to the placeholder (mw_task *)1 */
    mw_task *push_waiter;  /* a task in push_recv */
    int64_t phead, ptail;  /* the push queue: user value 2, indices phead..ptail-1 */
    int pushes;            /* keep pushes (else they are counted and dropped) */
    int64_t max_pushes;
    int64_t dropped;
    int failed;            /* the connection is broken: user values 3, 4 say why */
    double timeout;
    mw_resp r;
} rconn;

#define RC_MAGIC UINT64_C(0x6d77726573706373)   /* "mwrespcs" */

static rconn *checkrc(lua_State *L)
{
    rconn *c = mw_udata_magic(L, 1, sizeof(rconn), offsetof(rconn, magic), RC_MAGIC);
    if (!c) c = luaL_checkudata(L, 1, RC_MT);
    return c;
}

/* The task gave up its wait (timeout, cancel, end of run): its slot forgets it. */
static void unwait_slot(mw_task *t)
{
    rconn *c = t->wait_obj;
    uint64_t seq = t->wait_tag;
    if (seq >= c->head && seq < c->tail && c->ring[seq & (c->cap - 1)].t == t)
        c->ring[seq & (c->cap - 1)].t = NULL;
}

static void unwait_push(mw_task *t)
{
    rconn *c = t->wait_obj;
    if (c->push_waiter == t) c->push_waiter = NULL;
}

static int ring_push(rconn *c, mw_task *t, uint32_t n, int batch)
{
    if (c->tail - c->head == c->cap) {
        uint64_t ncap = c->cap ? c->cap * 2 : 64;
        slot *nr = malloc(ncap * sizeof *nr);
        if (!nr) return -1;
        for (uint64_t s = c->head; s < c->tail; s++) nr[s & (ncap - 1)] = c->ring[s & (c->cap - 1)];
        free(c->ring);
        c->ring = nr;
        c->cap = ncap;
    }
    slot *sl = &c->ring[c->tail & (c->cap - 1)];
    sl->t = t;
    sl->left = n;
    sl->batch = (uint32_t)batch;
    sl->ack = 0;
    sl->marker = 0;
    sl->answered = 0;
    if (t) t->wait_tag = c->tail;
    c->tail++;
    return 0;
}

/* Every waiting task gets nil, msg, code; later calls too. L's stack: the connection at 1. */
static void fail_all(lua_State *L, rconn *c, const char *msg, const char *code)
{
    if (!c->failed) {
        c->failed = 1;
        lua_pushstring(L, msg);
        lua_setiuservalue(L, 1, 3);
        lua_pushstring(L, code);
        lua_setiuservalue(L, 1, 4);
    }
    for (uint64_t s = c->head; s < c->tail; s++) {
        mw_task *t = c->ring[s & (c->cap - 1)].t;
        if (!t || !lua_checkstack(t->co, 4)) continue;
        lua_pushnil(t->co);
        lua_getiuservalue(L, 1, 3);
        lua_getiuservalue(L, 1, 4);
        lua_xmove(L, t->co, 2);
        t->unwait = NULL;
        mw_sched_wake(t, MW_WAKE_READY);
    }
    c->head = c->tail;
    if (c->push_waiter) mw_sched_wake(c->push_waiter, MW_WAKE_READY);
    if (!c->s->closed) mw_sock_close(c->s, 1);
}

static int push_failure(lua_State *L, int idx)
{
    lua_pushnil(L);
    lua_getiuservalue(L, idx, 3);
    lua_getiuservalue(L, idx, 4);
    return 3;
}

/* A SUBSCRIBE-family command's slot (the head) got all its answers: the task of rc_call, if
 * it still waits, gets true unless it got the error reply. */
static void ack_done(rconn *c, slot *sl)
{
    mw_task *w = sl->t;
    c->head++;
    if (!w) return;
    if (lua_gettop(w->co) == 1) lua_pushboolean(w->co, 1);
    w->unwait = NULL;
    mw_sched_wake(w, MW_WAKE_READY);
}

/* The reply at p (n bytes) goes to the task of the next slot, or to the push queue.
 * L's stack: the connection at 1, the error metatable at 2. Returns -1 on a reply nobody
 * asked for. */
static int deliver(lua_State *L, rconn *c, const char *p, size_t n)
{
    int top = lua_gettop(L);
    int t = build(L, 2, p, n);
    slot *head = c->head < c->tail ? &c->ring[c->head & (c->cap - 1)] : NULL;
    if (head && head->ack) {
        /* the answers of a SUBSCRIBE-family command come first (Redis answers in order); a
         * confirmation is a push (RESP3) or an array (RESP2) that starts with the kind */
        int conf = 0;
        if (t == MW_RESP_PUSH || t == MW_RESP_ARRAY) {
            conf = lua_rawgeti(L, -1, 1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), ACK_KINDS[head->ack]) == 0;
            lua_pop(L, 1);
        }
        if (conf) {
            head->answered = 1;
            if (!head->marker && --head->left == 0) ack_done(c, head);
            t = MW_RESP_PUSH;
        } else if (t == MW_RESP_PUSH) {
            /* a message or an invalidation meanwhile: not this command's */
        } else if (head->marker && head->answered) {
            ack_done(c, head);  /* the marker PING's reply: every confirmation came before it */
            lua_settop(L, top);
            return 0;
        } else {
            /* the command's reply: an error (a confirmation is a push). It goes to the task
             * of rc_call; for rc_send, to push_recv as an error object, never to the next
             * call. A marker's PING is still owed. */
            mw_task *w = head->t;
            if (w && lua_checkstack(w->co, 4)) {
                lua_pushnil(w->co);
                lua_xmove(L, w->co, 1);
                lua_pushliteral(w->co, "redis");
            } else if (is_error_type(t)) {
                size_t ln;
                const char *m = lua_tolstring(L, -1, &ln);
                push_errobj(L, 2, m, ln);
                lua_remove(L, -2);
            }
            if (head->marker) head->answered = 1;
            else ack_done(c, head);
            if (w) {
                lua_settop(L, top);
                return 0;
            }
            t = MW_RESP_PUSH;
        }
    }
    if (t == MW_RESP_PUSH) {
        if (!c->pushes) { c->dropped++; lua_settop(L, top); return 0; }
        lua_getiuservalue(L, 1, 2);
        lua_insert(L, -2);
        lua_rawseti(L, -2, c->ptail++);
        if (c->ptail - c->phead > c->max_pushes) {    /* the oldest goes */
            lua_pushnil(L);
            lua_rawseti(L, -2, c->phead++);
            c->dropped++;
        }
        lua_settop(L, top);
        if (c->push_waiter) mw_sched_wake(c->push_waiter, MW_WAKE_READY);
        return 0;
    }
    if (c->head == c->tail) { lua_settop(L, top); return -1; }
    slot *sl = &c->ring[c->head & (c->cap - 1)];
    mw_task *w = sl->t;
    if (w && lua_checkstack(w->co, 4)) {
        if (sl->batch) {
            if (is_error_type(t)) {
                size_t ln;
                const char *m = lua_tolstring(L, -1, &ln);
                push_errobj(L, 2, m, ln);
                lua_remove(L, -2);
            }
            lua_xmove(L, w->co, 1);
            lua_rawseti(w->co, 2, (lua_Integer)(sl->batch++));
        } else if (is_error_type(t)) {
            lua_pushnil(w->co);
            lua_xmove(L, w->co, 1);
            lua_pushliteral(w->co, "redis");
        } else {
            lua_xmove(L, w->co, 1);
        }
    }
    lua_settop(L, top);
    if (--sl->left == 0) {
        c->head++;
        if (w) {
            w->unwait = NULL;
            mw_sched_wake(w, MW_WAKE_READY);
        }
    }
    return 0;
}

static int reader_k(lua_State *L, int status, lua_KContext ctx);

/* The reader: the stack holds the connection at 1 and the error metatable at 2. */
static int reader_step(lua_State *L, rconn *c, mw_task *me)
{
    mw_sock *s = c->s;
    for (int fills = 0;; fills++) {
        for (;;) {
            size_t len = mw_buf_len(&s->rbuf);
            if (len == 0) break;
            const char *err;
            int64_t k = mw_resp_scan(&c->r, mw_buf_head(&s->rbuf), len, &err);
            if (k == 0) break;
            if (k < 0 || deliver(L, c, mw_buf_head(&s->rbuf), (size_t)k) < 0) {
                char msg[128];
                snprintf(msg, sizeof msg, "protocol error: %s", k < 0 ? err : "a reply nobody asked for");
                fail_all(L, c, msg, "protocol");
                c->reader = NULL;
                return 0;
            }
            mw_buf_consume(&s->rbuf, (size_t)k);
        }
        if (c->head == c->tail && !c->push_waiter) {
            c->reader = NULL;
            if (mw_buf_len(&s->rbuf) == 0) mw_buf_release(&s->rbuf, &s->rt->pool);
            return 0;
        }
        if (fills >= 16) return mw_sched_requeue(L, me, reader_k, 0);
        size_t len = mw_buf_len(&s->rbuf), need = mw_resp_need(&c->r);
        uint32_t want = EPOLLIN;
        int r = mw_stream_fill(s, need > len ? need - len : 16384, &want);
        if (r == 1) continue;
        if (r == -1) {
            if (len == 0) mw_buf_release(&s->rbuf, &s->rt->pool);
            return mw_sock_wait(L, s, me, MW_ROLE_READ, want, MW_NO_DEADLINE, reader_k, 0);
        }
        if (r == 0) fail_all(L, c, "closed", "closed");
        else {
            int e = errno;
            lua_settop(L, 2);
            mw_stream_pusherr(L, s, e);
            fail_all(L, c, lua_tostring(L, -2), lua_tostring(L, -1));
        }
        c->reader = NULL;
        return 0;
    }
}

static int reader_k(lua_State *L, int status, lua_KContext ctx)
{
    rconn *c = lua_touserdata(L, 1);
    mw_task *me = c->rt->current;
    int why = mw_sched_reason(me);
    (void)status; (void)ctx;
    if (c->s->closed || (why != MW_WAKE_READY && why != MW_WAKE_NONE)) {
        fail_all(L, c, "closed", "closed");
        c->reader = NULL;
        return 0;
    }
    return reader_step(L, c, me);
}

/* the reader task's function (upvalue 1: the error metatable); argument: the connection */
static int reader_main(lua_State *L)
{
    rconn *c = lua_touserdata(L, 1);
    lua_settop(L, 1);
    lua_pushvalue(L, lua_upvalueindex(1));
    c->reader = c->rt->current;
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->reader->ref);   /* anchored: ensure_reader reads its state */
    lua_setiuservalue(L, 1, 5);
    return reader_step(L, c, c->reader);
}

/* Starts the reader unless there is one. L: a connection method (upvalue 2: the reader). */
static void ensure_reader(lua_State *L, rconn *c)
{
    /* a reader ended by the end of a run (mw.stop) never cleared its mark; nor did one
     * dispatched in a run that ended before it first ran (the placeholder) */
    if (c->reader == (mw_task *)1 ? c->reader_run != c->rt->runs
                                  : c->reader && (c->reader->state == MW_T_DONE ||
                                                  c->reader->state == MW_T_FAILED))
        c->reader = NULL;
    if (c->reader) return;
    c->reader = (mw_task *)1;   /* until it runs: at most one is dispatched */
    c->reader_run = c->rt->runs;
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_pushvalue(L, 1);
    mw_sched_dispatch(c->rt, L);
}

static int sink_sock(void *ud, const char *a, size_t an, const char *b, size_t bn)
{
    return mw_sock_gather(ud, a, an, b, bn);
}

/* Writes the commands (already checked) into the socket's output buffer. */
static int queue_out(rconn *c)
{
    if (mw_buf_len(&c->s->obuf) > OUT_FLUSH) {
        uint32_t want;
        (void)mw_sock_flush(c->s, &want);   /* an error shows on the reader's next read */
    }
    return 0;
}

static int call_k(lua_State *L, int status, lua_KContext ctx)
{
    rconn *c = lua_touserdata(L, 1);
    int why = mw_sched_reason(c->rt->current);
    (void)status;
    if (why != MW_WAKE_READY) return mw_sched_pushwake(L, why);
    if (ctx == 0) return lua_gettop(L) - 1;
    return lua_gettop(L) == 2 ? 1 : 3;      /* the results, or a failure */
}

static int wait_reply(lua_State *L, rconn *c, mw_task *t, int batch)
{
    t->wait_obj = c;
    t->unwait = unwait_slot;
    ensure_reader(L, c);
    queue_out(c);
    return mw_sched_wait(L, t, mw_sched_after(c->rt, c->timeout), call_k, batch);
}

/* Writes the command at L[2..top] (checked) into the output buffer and takes its slot, for
 * task t (NULL: the reply is read and dropped). A SUBSCRIBE-family command's slot takes its
 * confirmations (pushes, which still go to the push queue) or its error reply, so that
 * neither goes to the next call's task. */
static void write_cmd(lua_State *L, rconn *c, int top, mw_task *t)
{
    size_t cl;
    const char *cmd = lua_tolstring(L, 2, &cl);
    char lc[16];
    int ack = 0, nargs = top - 2;
    if (cl < sizeof lc) {
        for (size_t i = 0; i <= cl; i++) lc[i] = (char)((cmd[i] >= 'A' && cmd[i] <= 'Z') ? cmd[i] + 32 : cmd[i]);
        for (int k = 1; k < (int)(sizeof ACK_KINDS / sizeof *ACK_KINDS); k++)
            if (strcmp(lc, ACK_KINDS[k]) == 0) ack = k;
    }
    /* An UNSUBSCRIBE of everything gets a confirmation per name it drops (one with a nil
     * name when there is none), and how many cannot be known here: the last one's count is
     * not 0 while patterns remain (Redis counts channels and patterns together), and
     * subscriptions may be on their way. So a PING follows it, and the PING's reply, which
     * Redis sends after every confirmation, ends its slot: "+PONG" under RESP3 (and RESP2
     * once nothing is subscribed), the array { "pong", "" } under RESP2 while subscribed;
     * neither is a confirmation. */
    int marker = ack && nargs == 0;
    encoder e;
    e.n = 0;
    e.sink = sink_sock;
    e.ud = c->s;
    if (encode(L, &e, 2, top) < 0) luaL_error(L, "not enough memory");
    if (marker) {
        lua_pushliteral(L, "PING");
        if (encode(L, &e, top + 1, top + 1) < 0) luaL_error(L, "not enough memory");
        lua_pop(L, 1);
    }
    if (enc_flush(&e, NULL, 0) < 0 || ring_push(c, t, ack && nargs > 0 ? (uint32_t)nargs : 1, 0) < 0)
        luaL_error(L, "not enough memory");
    slot *sl = &c->ring[(c->tail - 1) & (c->cap - 1)];
    sl->ack = (uint8_t)ack;
    sl->marker = (uint8_t)marker;
}

/* rc:call(cmd, ...) -> value | nil, message, "redis" (an error reply) | nil, err, code.
 * A SUBSCRIBE-family command returns true once all its confirmations came. */
static int rc_call(lua_State *L)
{
    rconn *c = checkrc(L);
    int top = lua_gettop(L);
    check_args(L, 2, top, lua_isstring(L, 2) ? lua_tostring(L, 2) : "call", 2);
    mw_task *t = mw_sched_self(L, c->rt);
    if (c->failed) return push_failure(L, 1);
    write_cmd(L, c, top, t);
    lua_settop(L, 1);
    return wait_reply(L, c, t, 0);
}

/* rc:send(cmd, ...) -> true | nil, err, code: writes a command no task waits for, for
 * commands whose answers come as RESP3 pushes (SUBSCRIBE and its family); any other
 * command's reply is read and dropped. */
static int rc_send(lua_State *L)
{
    rconn *c = checkrc(L);
    int top = lua_gettop(L);
    check_args(L, 2, top, lua_isstring(L, 2) ? lua_tostring(L, 2) : "send", 2);
    if (c->failed) return push_failure(L, 1);
    write_cmd(L, c, top, NULL);
    queue_out(c);
    lua_pushboolean(L, 1);
    return 1;
}

/* rc:batch(cmds) -> { reply, ... } (error replies as error objects) | nil, err, code.
 * cmds: a sequence of sequences { cmd, arg... }, written together, in order, one reply
 * each: no SUBSCRIBE-family command (the Lua layer refuses them, see record in redis.lua),
 * whose confirmations the batch's slot would not count. */
static int rc_batch(lua_State *L)
{
    rconn *c = checkrc(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = (lua_Integer)lua_rawlen(L, 2);
    luaL_argcheck(L, n > 0 && n < UINT32_MAX, 2, "commands expected");
    lua_settop(L, 2);
    for (lua_Integer i = 1; i <= n; i++) {   /* all checked before any is written */
        if (lua_rawgeti(L, 2, i) != LUA_TTABLE) luaL_error(L, "bad command #%d (table expected)", (int)i);
        int k = (int)lua_rawlen(L, 3);
        luaL_checkstack(L, k + 4, "too many arguments");
        for (int j = 1; j <= k; j++) lua_rawgeti(L, 3, j);
        check_args(L, 4, 3 + k, lua_isstring(L, 4) ? lua_tostring(L, 4) : "batch", 2);
        lua_settop(L, 2);
    }
    mw_task *t = mw_sched_self(L, c->rt);
    if (c->failed) return push_failure(L, 1);
    encoder e;
    e.n = 0;
    e.sink = sink_sock;
    e.ud = c->s;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, 2, i);
        int k = (int)lua_rawlen(L, 3);
        for (int j = 1; j <= k; j++) lua_rawgeti(L, 3, j);
        if (encode(L, &e, 4, 3 + k) < 0) return luaL_error(L, "not enough memory");
        lua_settop(L, 2);
    }
    if (enc_flush(&e, NULL, 0) < 0 || ring_push(c, t, (uint32_t)n, 1) < 0)
        return luaL_error(L, "not enough memory");
    lua_settop(L, 1);
    lua_createtable(L, (int)n, 0);       /* index 2: the results, filled by the reader */
    return wait_reply(L, c, t, 1);
}

static int push_k(lua_State *L, int status, lua_KContext ctx);

/* rc:push_recv([timeout]) -> the next push (a table) | nil, err, code */
static int push_step(lua_State *L, rconn *c, mw_task *t, int64_t deadline)
{
    if (c->phead < c->ptail) {
        lua_getiuservalue(L, 1, 2);
        lua_rawgeti(L, -1, c->phead);
        lua_pushnil(L);
        lua_rawseti(L, -3, c->phead++);
        return 1;
    }
    if (c->failed) return push_failure(L, 1);
    if (c->push_waiter && c->push_waiter != t) return luaL_error(L, "push_recv: another task is waiting");
    c->push_waiter = t;
    t->wait_obj = c;
    t->unwait = unwait_push;
    ensure_reader(L, c);
    return mw_sched_wait(L, t, deadline, push_k, (lua_KContext)deadline);
}

static int push_k(lua_State *L, int status, lua_KContext ctx)
{
    rconn *c = lua_touserdata(L, 1);
    mw_task *t = c->rt->current;
    int why = mw_sched_reason(t);
    (void)status;
    if (why != MW_WAKE_READY) return mw_sched_pushwake(L, why);
    lua_settop(L, 1);
    return push_step(L, c, t, (int64_t)ctx);
}

static int rc_push_recv(lua_State *L)
{
    rconn *c = checkrc(L);
    if (!c->pushes) return luaL_error(L, "push_recv: the connection was made without 'pushes'");
    int64_t d = mw_sched_deadline(L, c->rt, 2, -1);
    mw_task *t = mw_sched_self(L, c->rt);
    lua_settop(L, 1);
    return push_step(L, c, t, d);
}

/* rc:pending() -> replies owed, pushes queued, pushes dropped */
static int rc_pending(lua_State *L)
{
    rconn *c = checkrc(L);
    lua_pushinteger(L, (lua_Integer)(c->tail - c->head));
    lua_pushinteger(L, (lua_Integer)(c->ptail - c->phead));
    lua_pushinteger(L, (lua_Integer)c->dropped);
    return 3;
}

/* An idle connection (nothing owed, no reader) is probed without blocking, as a pooled pg
 * connection is (conn:check()): an end of stream or an error that no reader saw (the server
 * restarted while the connection sat in a pool) fails it now. Bytes waiting are pushes for
 * the next reader, or under TLS records to read through first. L's stack: the connection. */
static void probe_idle(lua_State *L, rconn *c)
{
    if (c->head != c->tail || c->reader || c->push_waiter) return;   /* the reader will see it */
    int p = mw_stream_probe(c->s);
    if (p == MW_PROBE_END) {
        fail_all(L, c, "closed", "closed");
    } else if (p == MW_PROBE_ERROR) {
        mw_stream_pusherr(L, c->s, errno);
        fail_all(L, c, lua_tostring(L, -2), lua_tostring(L, -1));
        lua_settop(L, 1);
    }
}

/* rc:alive() -> false once the connection failed or was closed (an idle one is probed) */
static int rc_alive(lua_State *L)
{
    rconn *c = checkrc(L);
    lua_settop(L, 1);
    if (!c->failed && !c->s->closed) probe_idle(L, c);
    lua_pushboolean(L, !c->failed && !c->s->closed);
    return 1;
}

static int rc_settimeout(lua_State *L)
{
    rconn *c = checkrc(L);
    c->timeout = luaL_optnumber(L, 2, -1);
    return 0;
}

/* rc:close(): the waiting tasks get nil, "closed", "closed". Idempotent. */
static int rc_close(lua_State *L)
{
    rconn *c = luaL_checkudata(L, 1, RC_MT);
    lua_settop(L, 1);
    if (c->s) fail_all(L, c, "closed", "closed");
    return 0;
}

static int rc_gc(lua_State *L)
{
    rconn *c = luaL_checkudata(L, 1, RC_MT);
    free(c->ring);
    c->ring = NULL;
    c->cap = c->head = c->tail = 0;
    return 0;
}

static int opt_num(lua_State *L, int t, const char *k, double dflt, double *out)
{
    int ty = lua_getfield(L, t, k);
    *out = ty == LUA_TNIL ? dflt : lua_tonumber(L, -1);
    lua_pop(L, 1);
    return ty;
}

/* resp_conn(sock, opts) -> rc; opts: timeout (s), max_bulk, max_depth, pushes (bool),
 * max_pushes. The connection owns the socket from now on. */
static int l_conn(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    size_t mb;
    int md;
    opt_limits(L, 2, &mb, &md);
    double timeout, maxp;
    opt_num(L, 2, "timeout", -1, &timeout);
    opt_num(L, 2, "max_pushes", 10000, &maxp);
    lua_getfield(L, 2, "pushes");
    int pushes = lua_toboolean(L, -1);
    lua_pop(L, 1);
    rconn *c = lua_newuserdatauv(L, sizeof *c, 5);
    memset(c, 0, sizeof *c);
    c->magic = RC_MAGIC;
    c->s = s;
    c->rt = s->rt;
    c->timeout = timeout;
    c->pushes = pushes;
    c->max_pushes = maxp < 1 ? 1 : (int64_t)maxp;
    c->phead = c->ptail = 1;
    mw_resp_init(&c->r, mb, md);
    luaL_setmetatable(L, RC_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    lua_newtable(L);
    lua_setiuservalue(L, -2, 2);
    return 1;
}

/* sha1hex(s) -> the SHA-1 of s in lower-case hex (script names for EVALSHA) */
static int l_sha1hex(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    unsigned char md[SHA_DIGEST_LENGTH];
    char hex[2 * SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)p, n, md);
    for (int i = 0; i < SHA_DIGEST_LENGTH; i++) {
        hex[2 * i] = "0123456789abcdef"[md[i] >> 4];
        hex[2 * i + 1] = "0123456789abcdef"[md[i] & 15];
    }
    lua_pushlstring(L, hex, sizeof hex);
    return 1;
}

void mw_redis_open(lua_State *L, int rtidx)
{
    /* the error object's metatable: { __name = "moonwire.RedisError", __tostring } */
    lua_newtable(L);
    int errmt = lua_gettop(L);
    lua_pushliteral(L, "moonwire.RedisError");
    lua_setfield(L, errmt, "__name");
    luaL_loadstring(L, "return function(e) return 'redis error: ' .. tostring(e.message) end");
    lua_call(L, 0, 1);
    lua_setfield(L, errmt, "__tostring");

    if (luaL_newmetatable(L, DEC_MT)) {
        static const luaL_Reg m[] = {
            { "feed", dec_feed }, { "next", dec_next }, { "buffered", dec_buffered }, { NULL, NULL }
        };
        luaL_newlibtable(L, m);
        lua_pushvalue(L, errmt);
        luaL_setfuncs(L, m, 1);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, dec_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);

    if (luaL_newmetatable(L, RC_MT)) {
        static const luaL_Reg m[] = {
            { "call", rc_call }, { "batch", rc_batch }, { "send", rc_send }, { "push_recv", rc_push_recv },
            { "pending", rc_pending }, { "alive", rc_alive }, { "settimeout", rc_settimeout },
            { "close", rc_close }, { NULL, NULL }
        };
        luaL_newlibtable(L, m);
        lua_pushvalue(L, rtidx);                   /* upvalue 1: the runtime */
        lua_pushvalue(L, errmt);
        lua_pushcclosure(L, reader_main, 1);       /* upvalue 2: the reader's function */
        luaL_setfuncs(L, m, 2);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, rc_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, rc_close);
        lua_setfield(L, -2, "__close");
    }
    lua_getfield(L, -1, "__index");
    lua_setfield(L, -4, "resp_methods");           /* the module table is below errmt */
    lua_pop(L, 1);

    lua_pushvalue(L, errmt);
    lua_setfield(L, -3, "resp_error_mt");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -3, "resp_null");
    static const luaL_Reg f[] = {
        { "resp_encode", l_encode }, { "resp_conn", l_conn }, { "sha1hex", l_sha1hex }, { NULL, NULL }
    };
    lua_pushvalue(L, -2);   /* the module table */
    luaL_setfuncs(L, f, 0);
    lua_pushcfunction(L, l_decoder);
    lua_setfield(L, -2, "resp_decoder");
    lua_pop(L, 2);
}
