/* stream: buffered reads with io.read's patterns, gathered writes with backpressure.
 * Each method is a non-blocking try; when the transport says EAGAIN the task parks on the
 * handle and the continuation runs the same try again. A timed-out or cancelled read
 * leaves what it had buffered in place, so a retry loses nothing. */
#define _GNU_SOURCE
#include "stream.h"
#include "list.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

enum { F_LINE, F_LINEKEEP, F_ALL, F_COUNT, F_SOME };
#define TRY_WAIT (-1)
#define TRY_AGAIN (-2)
#define FILLS_PER_TURN 16

/* ---- the output buffer ---------------------------------------------------------------- */

static void dirty_add(mw_sock *s)
{
    if (s->dirty) return;
    s->dirty = 1;
    MW_LIST_PUSH(s->rt->dirty, s, dprev, dnext);
}

static void dirty_remove(mw_sock *s)
{
    if (!s->dirty) return;
    MW_LIST_UNLINK(s->rt->dirty, s, dprev, dnext);
    s->dirty = 0;
}

int mw_sock_flush(mw_sock *s, uint32_t *want)
{
    while (mw_buf_len(&s->obuf) > 0) {
        struct iovec iov = { (void *)mw_buf_head(&s->obuf), mw_buf_len(&s->obuf) };
        ssize_t n = s->tp->writev(s, &iov, 1, want);
        if (n > 0) { mw_buf_consume(&s->obuf, (size_t)n); continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (n == 0) errno = EPIPE;
        return -1;
    }
    mw_buf_release(&s->obuf, &s->rt->pool);
    dirty_remove(s);
    return 1;
}

ssize_t mw_sock_writev(mw_sock *s, const struct iovec *iov, int n, uint32_t *want)
{
    if (mw_buf_len(&s->obuf) > 0) {
        int r = mw_sock_flush(s, want);
        if (r == 0) errno = EAGAIN;
        if (r <= 0) return -1;
    }
    return s->tp->writev(s, iov, n, want);
}

int mw_sock_gather(mw_sock *s, const char *a, size_t an, const char *b, size_t bn)
{
    size_t avail;
    char *p = mw_buf_reserve(&s->obuf, &s->rt->pool, an + bn, &avail);
    if (!p) return -1;
    memcpy(p, a, an);
    if (bn) memcpy(p + an, b, bn);
    mw_buf_commit(&s->obuf, an + bn);
    dirty_add(s);
    return 0;
}

/* Before the loop polls: what the dirty sockets gathered goes out, one write each. What the
 * socket does not take waits for its next writable event (on_sock_event marks it dirty
 * again); on an error it is dropped (the next read or write reports the error). */
static void flush_dirty(mw_rt *rt)
{
    mw_sock *s;
    while ((s = rt->dirty) != NULL) {
        dirty_remove(s);
        uint32_t want = EPOLLOUT;
        if (mw_sock_flush(s, &want) < 0) mw_buf_free(&s->obuf, &rt->pool);
    }
}

/* The runtime's sock_output: a socket with gathered output became writable, or is being
 * closed (a last try, then the rest is dropped: the peer stopped reading or is gone). */
static void output_event(mw_sock *s, int closing)
{
    if (closing) {
        uint32_t want;
        if (mw_buf_len(&s->obuf) > 0) (void)mw_sock_flush(s, &want);
        mw_buf_free(&s->obuf, &s->rt->pool);
        dirty_remove(s);
    } else if (mw_buf_len(&s->obuf) > 0) {
        dirty_add(s);
    }
}


static void consume(mw_sock *s, size_t n)
{
    mw_buf_consume(&s->rbuf, n);
    s->scan = 0;
}

int mw_stream_pusherr(lua_State *L, mw_sock *s, int err)
{
    if (err == EPROTO && s->tp->errmsg) {
        lua_pushnil(L);
        lua_pushfstring(L, "tls: %s", s->tp->errmsg(s));
        lua_pushliteral(L, "tls");
        return 3;
    }
    return mw_pusherrno(L, err);
}

int mw_stream_fill(mw_sock *s, size_t hint, uint32_t *want)
{
    size_t avail;
    char *w = mw_buf_reserve(&s->rbuf, &s->rt->pool, hint < 4096 ? 4096 : hint, &avail);
    if (!w) { errno = ENOMEM; return -3; }
    for (;;) {
        ssize_t n = s->tp->read(s, w, avail, want);
        if (n > 0) {
            mw_buf_commit(&s->rbuf, (size_t)n);
            s->last_rx = s->rt->loop.now;
            return 1;
        }
        if (n == 0) { s->eof = 1; return 0; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            s->want[MW_ROLE_READ] = *want;   /* also what a watch on s waits for */
            return TRY_WAIT;
        }
        return -3;
    }
}

/* Returns the number of values pushed, TRY_WAIT or TRY_AGAIN. */
static int read_try(lua_State *L, mw_sock *s, int fmt, size_t n, uint32_t *want)
{
    for (int fills = 0;; fills++) {
        size_t len = mw_buf_len(&s->rbuf);
        const char *p = mw_buf_head(&s->rbuf);
        size_t hint = 0;
        switch (fmt) {
        case F_LINE:
        case F_LINEKEEP: {
            const char *nl = len > s->scan ? memchr(p + s->scan, '\n', len - s->scan) : NULL;
            if (nl) {
                size_t whole = (size_t)(nl - p) + 1, out = whole;
                /* the line's length: without its "\n", nor a "\r" before it */
                size_t body = whole - 1 - (whole >= 2 && p[whole - 2] == '\r');
                if (body > s->maxline) return mw_pushfail(L, "line too long", "toolong");
                if (fmt == F_LINE) {
                    out--;
                    if (out > 0 && p[out - 1] == '\r') out--;
                }
                lua_pushlstring(L, p, out);
                consume(s, whole);
                return 1;
            }
            s->scan = len;
            if (s->eof) {
                if (len == 0) return mw_pushfail(L, "closed", "closed");
                lua_pushlstring(L, p, len);
                consume(s, len);
                return 1;
            }
            /* (a "\r" may end a line of maxline bytes while its "\n" is on the way) */
            if (len > s->maxline + (len > 0 && p[len - 1] == '\r')) return mw_pushfail(L, "line too long", "toolong");
            break;
        }
        case F_ALL:
            if (s->eof) {
                lua_pushlstring(L, p, len);
                consume(s, len);
                return 1;
            }
            hint = len < 65536 ? 16384 : len;
            break;
        case F_COUNT:
            if (len >= n) {
                lua_pushlstring(L, p, n);
                consume(s, n);
                return 1;
            }
            if (s->eof) return mw_pushfail(L, "closed", "closed");
            hint = n - len;
            break;
        default: /* F_SOME */
            if (len > 0) {
                size_t k = len < n ? len : n;
                lua_pushlstring(L, p, k);
                consume(s, k);
                return 1;
            }
            if (s->eof) return mw_pushfail(L, "closed", "closed");
            break;
        }
        if (fills >= FILLS_PER_TURN) return TRY_AGAIN;
        int r = mw_stream_fill(s, hint, want);
        if (r == TRY_WAIT) return TRY_WAIT;
        if (r == -3) return mw_stream_pusherr(L, s, errno);
    }
}

/* Parses the pattern at idx (raising on a bad one). */
static int parse_fmt(lua_State *L, int idx, size_t *n)
{
    if (lua_type(L, idx) == LUA_TNUMBER) {
        lua_Integer k = luaL_checkinteger(L, idx);
        luaL_argcheck(L, k >= 0, idx, "count must be non-negative");
        *n = (size_t)k;
        return F_COUNT;
    }
    const char *f = luaL_optstring(L, idx, "l");
    if (*f == '*') f++;  /* Lua 5.1 style "*l" */
    switch (*f) {
    case 'l': return F_LINE;
    case 'L': return F_LINEKEEP;
    case 'a': return F_ALL;
    default: return luaL_argerror(L, idx, lua_pushfstring(L, "invalid format '%s'", f));
    }
}

static int read_k(lua_State *L, int status, lua_KContext ctx);

static int read_step(lua_State *L, mw_sock *s, mw_task *t, int fmt, size_t n, lua_KContext ctx)
{
    uint32_t want = EPOLLIN;
    int r = read_try(L, s, fmt, n, &want);
    if (r == TRY_WAIT) {
        mw_buf_release(&s->rbuf, &s->rt->pool);  /* idle: hold no buffer */
        return mw_sock_wait(L, s, t, MW_ROLE_READ, want, s->rdeadline, read_k, ctx);
    }
    if (r == TRY_AGAIN) return mw_sched_requeue(L, t, read_k, ctx);
    return mw_sched_checkpoint(L, t, r);
}

/* ctx: 0 for read(fmt), 1 for recv(n) */
static int read_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_sock *s = lua_touserdata(L, 1);
    mw_task *t = s->rt->current;
    int why = mw_sched_reason(t);
    (void)status;
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (s->closed) return mw_pushfail(L, "closed", "closed");
    size_t n = 0;
    int fmt;
    if (ctx) {
        fmt = F_SOME;
        n = (size_t)luaL_optinteger(L, 2, 65536);
    } else {
        fmt = parse_fmt(L, 2, &n);
    }
    return read_step(L, s, t, fmt, n, ctx);
}

static int s_read(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    size_t n = 0;
    int fmt = parse_fmt(L, 2, &n);
    int64_t d = mw_sched_deadline(L, s->rt, 3, s->timeout);
    mw_task *t = mw_sock_claim(L, s, MW_ROLE_READ);
    s->rdeadline = d;
    return read_step(L, s, t, fmt, n, 0);
}

static int s_recv(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    lua_Integer n = luaL_optinteger(L, 2, 65536);
    luaL_argcheck(L, n > 0, 2, "size must be positive");
    int64_t d = mw_sched_deadline(L, s->rt, 3, s->timeout);
    mw_task *t = mw_sock_claim(L, s, MW_ROLE_READ);
    s->rdeadline = d;
    return read_step(L, s, t, F_SOME, (size_t)n, 1);
}

/* 0: all sent, TRY_WAIT, -3: error (errno). *sent counts bytes of args 2..top sent. */
static int write_try(lua_State *L, mw_sock *s, int top, size_t *sent, uint32_t *want)
{
    for (;;) {
        struct iovec iov[64];
        int cnt = 0;
        size_t skip = *sent;
        for (int i = 2; i <= top && cnt < 64; i++) {
            size_t len;
            const char *p = lua_tolstring(L, i, &len);
            if (skip >= len) { skip -= len; continue; }
            iov[cnt].iov_base = (void *)(p + skip);
            iov[cnt].iov_len = len - skip;
            skip = 0;
            cnt++;
        }
        if (cnt == 0) return 0;
        ssize_t n = mw_sock_writev(s, iov, cnt, want);
        if (n >= 0) { *sent += (size_t)n; continue; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return TRY_WAIT;
        return -3;
    }
}

static int write_k(lua_State *L, int status, lua_KContext ctx);

static int write_step(lua_State *L, mw_sock *s, mw_task *t, size_t sent)
{
    uint32_t want = EPOLLOUT;
    size_t before = sent;
    int r = write_try(L, s, lua_gettop(L), &sent, &want);
    if (r == TRY_WAIT) {
        /* the timeout bounds a wait without progress, not the whole write (as sendfile's):
         * a large write to a peer that keeps reading, slowly, is never cut */
        if (sent > before) s->wdeadline = mw_sched_after(s->rt, s->timeout);
        return mw_sock_wait(L, s, t, MW_ROLE_WRITE, want, s->wdeadline, write_k, (lua_KContext)sent);
    }
    if (r == -3) {
        int e = errno;
        mw_stream_pusherr(L, s, e);
        lua_pushinteger(L, (lua_Integer)sent);
        return 4;
    }
    lua_pushvalue(L, 1);
    return mw_sched_checkpoint(L, t, 1);
}

static int write_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_sock *s = lua_touserdata(L, 1);
    mw_task *t = s->rt->current;
    int why = mw_sched_reason(t);
    (void)status;
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) {
        mw_sched_pushwake(L, why);
        lua_pushinteger(L, (lua_Integer)ctx);
        return 4;
    }
    if (s->closed) {
        mw_pushfail(L, "closed", "closed");
        lua_pushinteger(L, (lua_Integer)ctx);
        return 4;
    }
    return write_step(L, s, t, (size_t)ctx);
}

static int s_write(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    int top = lua_gettop(L);
    for (int i = 2; i <= top; i++) luaL_checklstring(L, i, NULL);  /* numbers become strings */
    mw_task *t = mw_sock_claim(L, s, MW_ROLE_WRITE);
    s->wdeadline = mw_sched_after(s->rt, s->timeout);
    return write_step(L, s, t, 0);
}

static void mw_stream_sendfile(lua_State *L);

/* sock:buffered() -> n: bytes received and not yet returned by a read (the stream's buffer,
 * plus what the transport holds: TLS may count its undecrypted records as 1). No syscall:
 * a connection that holds some is not at a message boundary (pools, starttls check it). */
/* sock:_last_read() -> seconds (mw.now's clock) of the last read that brought bytes, or nil
 * (websocket.lua's idle_timeout: a message still arriving in pieces is not silence) */
static int s_last_read(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    if (!s->last_rx) return 0;
    lua_pushnumber(L, (double)s->last_rx / 1e9);
    return 1;
}

static int s_buffered(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    size_t n = mw_buf_len(&s->rbuf);
    if (s->tp->pending) n += (size_t)s->tp->pending(s);
    lua_pushinteger(L, (lua_Integer)n);
    return 1;
}

int mw_stream_probe(mw_sock *s)
{
    if (s->eof) return MW_PROBE_END;
    if (mw_buf_len(&s->rbuf) > 0 || (s->tp->pending && s->tp->pending(s))) return MW_PROBE_DATA;
    char c;
    ssize_t n = recv(s->io.fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? MW_PROBE_QUIET : MW_PROBE_ERROR;
    if (n == 0) return MW_PROBE_END;
    if (!s->tp->pending) return MW_PROBE_DATA;
    /* TLS: records that carry no data (TLS 1.3's session tickets after the handshake, a key
     * update) are not the peer talking: read them through; data or the end is, and so is
     * the start of a record whose rest is on the way (left in OpenSSL's buffer) */
    uint32_t want = EPOLLIN;
    int r = mw_stream_fill(s, 0, &want);
    int data = mw_buf_len(&s->rbuf) > 0 || s->tp->pending(s), e = errno;
    if (!data) mw_buf_release(&s->rbuf, &s->rt->pool);
    errno = e;
    if (r == 0) return MW_PROBE_END;
    if (r == -3) return MW_PROBE_ERROR;
    return data ? MW_PROBE_DATA : MW_PROBE_QUIET;
}

/* s:alive() -> whether an idle connection is still usable: the peer has not closed it and
 * sent nothing unasked (a pooled HTTP connection must be silent). Never blocks. */
static int s_alive(lua_State *L)
{
    mw_sock *s = luaL_checkudata(L, 1, MW_SOCK_MT);
    lua_pushboolean(L, !s->closed && mw_stream_probe(s) == MW_PROBE_QUIET);
    return 1;
}

void mw_stream_open(lua_State *L, int rtidx)
{
    static const luaL_Reg m[] = {
        { "read", s_read }, { "recv", s_recv }, { "write", s_write }, { "buffered", s_buffered }, { "_last_read", s_last_read },
        { "alive", s_alive },
        { NULL, NULL }
    };
    mw_rt *rt = lua_touserdata(L, rtidx);
    rt->before_poll = flush_dirty;
    rt->sock_output = output_event;
    luaL_getmetatable(L, MW_SOCK_MT);
    lua_getfield(L, -1, "__index");
    luaL_setfuncs(L, m, 0);
    mw_stream_sendfile(L);
    lua_pop(L, 2);
}

/* ---- sendfile ----------------------------------------------------------------------- */

#include <fcntl.h>
#include <stdio.h>
#include <sys/sendfile.h>
#include <unistd.h>

/* The file of a sendfile in progress: a userdata on the task's stack (index 5). One opened
 * here from a path (own) is closed on every way out of the send (done, failed, timed out,
 * cancelled, the socket closed) through sf_end, its __gc the last resort (a raise, a task
 * that never resumes): left to the collector, each client gone mid-file held a descriptor
 * until the next cycle. One given as an io file (index 2) stays open: it is the caller's. */
typedef struct { int fd; int own; off_t off; size_t left; } sendfile_t;

static void sf_close(sendfile_t *f)
{
    if (f->fd >= 0 && f->own) close(f->fd);
    f->fd = -1;
}

static int sf_gc(lua_State *L)
{
    sf_close(lua_touserdata(L, 1));
    return 0;
}

/* The send is over: its file is closed, `nret` (the values pushed for the caller) returned.
 * (The values are pushed first, in the argument, so errno is read before close.) */
static int sf_end(sendfile_t *f, int nret)
{
    sf_close(f);
    return nret;
}

static int sendfile_k(lua_State *L, int status, lua_KContext ctx);

static int sendfile_step(lua_State *L, mw_sock *s, mw_task *t, sendfile_t *f)
{
    uint32_t want = EPOLLOUT;
    int r = mw_buf_len(&s->obuf) > 0 ? mw_sock_flush(s, &want) : 1;  /* what was gathered first */
    if (r == 0) return mw_sock_wait(L, s, t, MW_ROLE_WRITE, want, s->wdeadline, sendfile_k, 0);
    if (r < 0) return sf_end(f, mw_pusherrno(L, errno));
    int moved = 0;
    while (f->left > 0) {
        ssize_t n = sendfile(s->io.fd, f->fd, &f->off, f->left > 0x7ffff000 ? 0x7ffff000 : f->left);
        if (n > 0) { f->left -= (size_t)n; moved = 1; continue; }
        if (n == 0) return sf_end(f, mw_pushfail(L, "file shorter than expected", "EIO"));
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            /* the timeout bounds a wait with no progress, not the whole file (as the 64 KiB
             * pieces of a copy through TLS or HTTP/2 each get it): a large file to a client
             * that keeps reading is never cut */
            if (moved) s->wdeadline = mw_sched_after(s->rt, s->timeout);
            return mw_sock_wait(L, s, t, MW_ROLE_WRITE, EPOLLOUT, s->wdeadline, sendfile_k, 0);
        }
        return sf_end(f, mw_pusherrno(L, errno));
    }
    lua_pushboolean(L, 1);
    return sf_end(f, 1);
}

static int sendfile_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_sock *s = lua_touserdata(L, 1);
    sendfile_t *f = lua_touserdata(L, 5);
    mw_task *t = s->rt->current;
    int why = mw_sched_reason(t);
    (void)status; (void)ctx;
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return sf_end(f, mw_sched_pushwake(L, why));
    if (s->closed) return sf_end(f, mw_pushfail(L, "closed", "closed"));
    /* the caller's file, closed meanwhile (by another task): its descriptor's number may
     * name another file by now */
    if (!f->own && ((luaL_Stream *)lua_touserdata(L, 2))->closef == NULL) {
        sf_end(f, 0);
        return luaL_error(L, "attempt to use a closed file");
    }
    return sendfile_step(L, s, t, f);
}

/* sock:sendfile(file | path, offset, length) -> true | nil, err, code. A file (an io library
 * file: core.open_file's, io.open's) is sent from and left open; a path is opened here. */
static int s_sendfile(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    luaL_Stream *file = NULL;
    const char *path = NULL;
    size_t plen = 0;
    if (lua_type(L, 2) == LUA_TUSERDATA) {
        file = luaL_checkudata(L, 2, LUA_FILEHANDLE);
        luaL_argcheck(L, file->closef != NULL, 2, "attempt to use a closed file");
    } else {
        path = luaL_checklstring(L, 2, &plen);
    }
    if (s->tp != &mw_plain_transport) return mw_pushfail(L, "sendfile is not available on TLS sockets", "EOPNOTSUPP");
    lua_Integer off = luaL_optinteger(L, 3, 0);
    lua_Integer len = luaL_checkinteger(L, 4);
    luaL_argcheck(L, off >= 0, 3, "offset must be non-negative");
    luaL_argcheck(L, len >= 0, 4, "length must be non-negative");
    mw_task *t = mw_sock_claim(L, s, MW_ROLE_WRITE);
    s->wdeadline = mw_sched_after(s->rt, s->timeout);
    lua_settop(L, 4);
    sendfile_t *f = lua_newuserdatauv(L, sizeof *f, 0);
    f->fd = -1;
    f->own = file == NULL;
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, sf_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    if (file) {
        f->fd = fileno(file->f);
    } else {
        if (strlen(path) != plen) return mw_pushfail(L, "path contains a NUL byte", "EINVAL");
        f->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (f->fd < 0) return mw_pusherrno(L, errno);
    }
    f->off = (off_t)off;
    f->left = (size_t)len;
    /* index 1: the socket, 2: a caller's file, 5: the file's state: sendfile_k finds them there */
    return sendfile_step(L, s, t, f);
}

static void mw_stream_sendfile(lua_State *L)
{
    lua_pushcfunction(L, s_sendfile);
    lua_setfield(L, -2, "sendfile");
}
