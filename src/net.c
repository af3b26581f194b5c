/* net: creating, connecting, accepting, configuring and closing socket handles, TCP and
 * Unix. Handles are created closed and then opened, so a memory error never leaves a
 * half-made one; close, __close and __gc are one idempotent function. */
#define _GNU_SOURCE
#include "net.h"
#include "dns.h"
#include "mwlua.h"
#include "list.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_MAXLINE (1024 * 1024)

/* ---- watches: a function to run, in a worker, once the socket is readable ------------ */

/* Drops the watch of s (armed or not); `L` NULL: from __gc, no Lua call allowed. */
static void unqueue(mw_sock *s)
{
    if (!s->fired) return;
    s->fired = 0;
    MW_LIST_UNLINK(s->rt->fired, s, fprev, fnext);
}

static void drop_watch(mw_sock *s, lua_State *L)
{
    mw_rt *rt = s->rt;
    unqueue(s);
    MW_LIST_UNLINK(rt->watching, s, wprev, wnext);
    if (s->armed) rt->nwatch--;
    s->armed = 0;
    int ref = s->watch_ref;
    s->watch_ref = LUA_NOREF;
    if (!L) return;
    lua_checkstack(L, 3);
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    lua_pushnil(L);
    lua_setiuservalue(L, -2, 2);
    lua_pushnil(L);
    lua_setiuservalue(L, -2, 3);
    lua_pop(L, 1);
}

/* The watch fires: its fn(arg) goes to a worker; it stays registered, disarmed. This
 * allocates, so it never runs inside an event batch (see queue_fire). */
static void fire_watch(mw_sock *s)
{
    mw_rt *rt = s->rt;
    lua_State *L = rt->L;
    unqueue(s);
    s->armed = 0;
    rt->nwatch--;
    lua_checkstack(L, 5);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->watch_ref);
    lua_getiuservalue(L, -1, 2);
    lua_getiuservalue(L, -2, 3);
    lua_remove(L, -3);
    mw_sched_dispatch(rt, L);
}

/* From an event callback: the watch fires once the batch is over (run_fired). Starting a
 * worker allocates, and a collection inside the batch could free a socket that a later
 * event of the same batch points to. A queued socket is anchored by its watch_ref, and
 * leaves the queue when its watch is dropped. */
static void queue_fire(mw_sock *s)
{
    if (s->fired) return;
    s->fired = 1;
    MW_LIST_PUSH(s->rt->fired, s, fprev, fnext);
}

/* the runtime's after_poll: runs the watches that fired in the batch */
static void run_fired(mw_rt *rt)
{
    while (rt->fired) fire_watch(rt->fired);
}

/* the runtime's after_run: a run that ended leaves no watch behind */
static void unwatch_all(mw_rt *rt, lua_State *L)
{
    while (rt->watching) drop_watch(rt->watching, L);
}

/* The magic number of each kind of handle. */
static uint64_t magic_of(const char *mt)
{
    return strcmp(mt, MW_SOCK_MT) == 0 ? MW_SOCK_MAGIC : MW_LISTENER_MAGIC;
}

/* Whether a read on s may find something now (bytes, the end, an error, closed). */
static int may_read(mw_sock *s)
{
    return s->closed || s->rready || mw_buf_len(&s->rbuf) > 0 || (s->tp->pending && s->tp->pending(s));
}

/* Arms the watch of a socket that has nothing to read now. */
static void arm(mw_sock *s)
{
    s->armed = 1;
    s->rt->nwatch++;
    mw_buf_release(&s->rbuf, &s->rt->pool);  /* it is empty: an idle socket holds no buffer */
}

/* watch(sock, fn, arg): runs fn(arg) in a worker task once sock has something to read
 * (bytes, the end, an error, or it was closed) -- at once when it may have already. One
 * shot: watch(sock) arms it again, with the same fn and arg; unwatch(sock) drops it.
 * No task waits meanwhile. The socket must have no reading task while armed. */
static int l_watch(lua_State *L)
{
    mw_sock *s = luaL_checkudata(L, 1, MW_SOCK_MT);
    mw_rt *rt = s->rt;
    if (!rt->running) return luaL_error(L, "watch: the loop is not running");
    if (s->armed) return luaL_error(L, "watch: the socket is already watched");
    if (s->waiter[MW_ROLE_READ]) return luaL_error(L, "watch: the socket has a reading task");
    if (lua_isnoneornil(L, 2)) {
        if (s->watch_ref == LUA_NOREF) return luaL_error(L, "watch: the socket has no watch to arm");
    } else {
        luaL_checktype(L, 2, LUA_TFUNCTION);
        if (s->watch_ref != LUA_NOREF) drop_watch(s, L);
        lua_settop(L, 3);
        lua_setiuservalue(L, 1, 3);
        lua_setiuservalue(L, 1, 2);
        s->watch_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        MW_LIST_PUSH(rt->watching, s, wprev, wnext);
    }
    if (may_read(s)) {       /* something to read already: the watch fires at once */
        s->armed = 1;
        rt->nwatch++;
        fire_watch(s);
    } else {
        arm(s);
    }
    return 0;
}

/* rewatch(sock) -> true when the watch is armed again; false, not armed, when a read may
 * find something now (the caller reads, then calls rewatch again). */
static int l_rewatch(lua_State *L)
{
    mw_sock *s = mw_udata_magic(L, 1, sizeof(mw_sock), offsetof(mw_sock, magic), MW_SOCK_MAGIC);
    if (!s) s = mw_checkudata_up(L, 1, 1, MW_SOCK_MT);     /* upvalue: the metatable */
    if (s->watch_ref == LUA_NOREF) return luaL_error(L, "rewatch: the socket has no watch");
    if (s->armed) return luaL_error(L, "rewatch: the socket is already watched");
    int now = may_read(s);
    if (!now) arm(s);
    lua_pushboolean(L, !now);
    return 1;
}

/* unwatch(sock) -> whether its watch was armed (the watch is dropped, fn not run) */
static int l_unwatch(lua_State *L)
{
    mw_sock *s = luaL_checkudata(L, 1, MW_SOCK_MT);
    int armed = s->armed;
    if (s->watch_ref != LUA_NOREF) drop_watch(s, L);
    lua_pushboolean(L, armed);
    return 1;
}

/* Edge-triggered: a read that comes back short drained the kernel's queue, and data that
 * arrives later raises a new event, so the next read waits for it instead of asking the
 * kernel for an EAGAIN (as nginx does). Not after the peer's FIN: its edge may already
 * have been consumed together with the data, so the end must be read. */
ssize_t mw_sock_recv(mw_sock *s, char *buf, size_t len)
{
    if (!s->rready) {
        errno = EAGAIN;
        return -1;
    }
    ssize_t n = recv(s->io.fd, buf, len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) s->rready = 0;
    else if (n > 0 && (size_t)n < len && !s->rdhup) s->rready = 0;
    return n;
}

static ssize_t plain_read(mw_sock *s, char *buf, size_t len, uint32_t *want)
{
    ssize_t n = mw_sock_recv(s, buf, len);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) *want = EPOLLIN;
    return n;
}

static ssize_t plain_writev(mw_sock *s, const struct iovec *iov, int n, uint32_t *want)
{
    ssize_t r;
    if (n == 1) {
        /* one buffer (a broadcast's frame, a small WebSocket frame): send(2) skips the
         * msghdr and iovec copies sendmsg(2) makes */
        r = send(s->io.fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
    } else {
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = (struct iovec *)iov;
        m.msg_iovlen = (size_t)n;
        r = sendmsg(s->io.fd, &m, MSG_NOSIGNAL);
    }
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) *want = EPOLLOUT;
    return r;
}

/* Plain sockets: recv and sendmsg on the descriptor. */
const mw_transport mw_plain_transport = { plain_read, plain_writev, NULL, NULL, NULL, NULL, NULL };

/* ---- handles ---------------------------------------------------------------------- */

static void on_sock_event(mw_io *io, uint32_t ev)
{
    mw_sock *s = (mw_sock *)io;
    const uint32_t always = EPOLLERR | EPOLLHUP;
    if (ev & (EPOLLIN | EPOLLRDHUP | always)) {
        s->rready = 1;
        if (ev & (EPOLLRDHUP | always)) s->rdhup = 1;
    }
    if (s->obuf.data && (ev & (EPOLLOUT | EPOLLIN | always))) s->rt->sock_output(s, 0);  /* TLS may need either */
    if (s->armed) {
        uint32_t want = s->want[MW_ROLE_READ] | EPOLLIN | EPOLLRDHUP;
        if (ev & (want | always)) queue_fire(s);
    }
    for (int role = 0; role < 2; role++) {
        mw_task *t = s->waiter[role];
        uint32_t want = s->want[role];
        if (want == EPOLLIN) want |= EPOLLRDHUP;
        if (t && (ev & (want | always))) mw_sched_wake(t, MW_WAKE_READY);
    }
}

mw_sock *mw_sock_new(lua_State *L, mw_rt *rt, const char *mt)
{
    mw_sock *s = lua_newuserdatauv(L, sizeof *s, 3);
    memset(s, 0, sizeof *s);
    s->magic = magic_of(mt);
    s->watch_ref = LUA_NOREF;
    s->io.fd = -1;
    s->io.on_event = on_sock_event;
    s->rt = rt;
    s->closed = 1;
    s->timeout = -1;
    s->maxline = DEFAULT_MAXLINE;
    s->tp = &mw_plain_transport;
    luaL_setmetatable(L, mt);
    return s;
}

int mw_sock_open(mw_sock *s, int fd)
{
    s->io.fd = fd;
    if (mw_loop_add(&s->rt->loop, &s->io) < 0) {
        int e = errno;
        close(fd);
        s->io.fd = -1;
        errno = e;
        return -1;
    }
    s->closed = 0;
    s->eof = 0;
    s->scan = 0;
    s->rready = 1;
    s->rdhup = 0;
    return 0;
}

void mw_sock_close(mw_sock *s, int wake)
{
    if (s->obuf.data || s->dirty) s->rt->sock_output(s, 1);
    if (s->tp->close) s->tp->close(s);
    s->tp = &mw_plain_transport;
    if (s->io.fd >= 0) {
        mw_loop_del(&s->rt->loop, &s->io);
        close(s->io.fd);
        s->io.fd = -1;
    }
    s->closed = 1;
    mw_buf_free(&s->rbuf, &s->rt->pool);
    s->scan = 0;
    if (s->watch_ref != LUA_NOREF) {
        /* closed while watched: the watch runs and finds it closed. Not from __gc (nothing
         * may run then; a watched handle is only collected by lua_close) */
        if (s->armed && wake && s->rt->running) fire_watch(s);
        else if (!wake || !s->rt->running) drop_watch(s, NULL);
    }
    for (int role = 0; role < 2; role++) {
        mw_task *t = s->waiter[role];
        if (!t) continue;
        if (wake) mw_sched_wake(t, MW_WAKE_CLOSED);  /* its unwait clears the slot */
        else mw_sched_forget(t, s);     /* collected: the task must not point here any more */
        s->waiter[role] = NULL;
    }
}

mw_sock *mw_sock_check(lua_State *L, int idx, const char *mt)
{
    mw_sock *s = mw_udata_magic(L, idx, sizeof(mw_sock), offsetof(mw_sock, magic), magic_of(mt));
    if (!s) s = luaL_checkudata(L, idx, mt);
    if (s->closed) luaL_error(L, "attempt to use a closed socket");
    return s;
}

/* Either kind of handle (for the shared methods). */
static mw_sock *checkany(lua_State *L, int idx)
{
    mw_sock *s = luaL_testudata(L, idx, MW_SOCK_MT);
    if (!s) s = luaL_testudata(L, idx, MW_LISTENER_MT);
    if (!s) luaL_typeerror(L, idx, "moonwire socket");
    if (s->closed) luaL_error(L, "attempt to use a closed socket");
    return s;
}

static void unwait_reader(mw_task *t) { ((mw_sock *)t->wait_obj)->waiter[MW_ROLE_READ] = NULL; }
static void unwait_writer(mw_task *t) { ((mw_sock *)t->wait_obj)->waiter[MW_ROLE_WRITE] = NULL; }

mw_task *mw_sock_claim(lua_State *L, mw_sock *s, int role)
{
    mw_task *t = mw_sched_self(L, s->rt);
    if (s->waiter[role] && s->waiter[role] != t)
        luaL_error(L, "socket already has a %s task", role == MW_ROLE_READ ? "reading" : "writing");
    return t;
}

int mw_sock_wait(lua_State *L, mw_sock *s, mw_task *t, int role, uint32_t want,
                 int64_t deadline, lua_KFunction k, lua_KContext ctx)
{
    if (s->waiter[role] && s->waiter[role] != t)
        return luaL_error(L, "socket already has a %s task", role == MW_ROLE_READ ? "reading" : "writing");
    s->waiter[role] = t;
    s->want[role] = want;
    t->wait_obj = s;
    t->unwait = role == MW_ROLE_READ ? unwait_reader : unwait_writer;
    return mw_sched_wait(L, t, deadline, k, ctx);
}

static int h_close(lua_State *L)
{
    mw_sock *s = lua_touserdata(L, 1);
    if (!luaL_testudata(L, 1, MW_SOCK_MT) && !luaL_testudata(L, 1, MW_LISTENER_MT))
        return luaL_typeerror(L, 1, "moonwire socket");
    mw_sock_close(s, 1);
    return 0;
}

static int h_gc(lua_State *L)
{
    mw_sock *s = lua_touserdata(L, 1);
    mw_sock_close(s, 0);
    return 0;
}

/* ---- addresses --------------------------------------------------------------------- */

/* Pushes host, port (2 values) or the Unix path (1 value). */
static int push_addr(lua_State *L, const struct sockaddr_storage *ss, socklen_t len)
{
    char buf[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
        lua_pushstring(L, buf);
        lua_pushinteger(L, ntohs(a->sin_port));
        return 2;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
        lua_pushstring(L, buf);
        lua_pushinteger(L, ntohs(a->sin6_port));
        return 2;
    }
    if (ss->ss_family == AF_UNIX) {
        const struct sockaddr_un *a = (const struct sockaddr_un *)ss;
        size_t n = len > offsetof(struct sockaddr_un, sun_path) ? len - offsetof(struct sockaddr_un, sun_path) : 0;
        if (n > 0 && a->sun_path[0] == '\0') {
            lua_pushliteral(L, "@");
            lua_pushlstring(L, a->sun_path + 1, n - 1);
            lua_concat(L, 2);
        } else {
            lua_pushstring(L, a->sun_path);  /* NUL-terminated within len */
        }
        return 1;
    }
    lua_pushnil(L);
    return 1;
}

static int h_getsockname(lua_State *L)
{
    mw_sock *s = checkany(L, 1);
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    memset(&ss, 0, sizeof ss);
    if (getsockname(s->io.fd, (struct sockaddr *)&ss, &len) < 0) return mw_pusherrno(L, errno);
    return push_addr(L, &ss, len);
}

static int h_getpeername(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    memset(&ss, 0, sizeof ss);
    if (getpeername(s->io.fd, (struct sockaddr *)&ss, &len) < 0) return mw_pusherrno(L, errno);
    return push_addr(L, &ss, len);
}

/* Fills a sockaddr_un from a path ("@name": abstract namespace). 0 or -1 (too long). */
static int unix_addr(const char *path, size_t plen, struct sockaddr_un *a, socklen_t *len)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if (plen >= sizeof a->sun_path) return -1;
    memcpy(a->sun_path, path, plen);
    if (path[0] == '@') {
        a->sun_path[0] = '\0';
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
    } else {
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);
    }
    return 0;
}

/* ---- options ----------------------------------------------------------------------- */

static const struct { const char *name; int level, opt, boolean; } options[] = {
    { "nodelay", IPPROTO_TCP, TCP_NODELAY, 1 },
    { "keepalive", SOL_SOCKET, SO_KEEPALIVE, 1 },
    { "reuseaddr", SOL_SOCKET, SO_REUSEADDR, 1 },
    { "reuseport", SOL_SOCKET, SO_REUSEPORT, 1 },
    { "sndbuf", SOL_SOCKET, SO_SNDBUF, 0 },
    { "rcvbuf", SOL_SOCKET, SO_RCVBUF, 0 },
    { NULL, 0, 0, 0 }
};

static int find_option(lua_State *L, int idx)
{
    const char *name = luaL_checkstring(L, idx);
    if (strcmp(name, "maxline") == 0) return -1;
    for (int i = 0; options[i].name; i++)
        if (strcmp(options[i].name, name) == 0) return i;
    return luaL_argerror(L, idx, lua_pushfstring(L, "unknown option '%s'", name));
}

static int set_int_option(int fd, int i, int v)
{
    return setsockopt(fd, options[i].level, options[i].opt, &v, sizeof v);
}

static int h_setoption(lua_State *L)
{
    mw_sock *s = checkany(L, 1);
    int i = find_option(L, 2);
    if (i < 0) {
        lua_Integer n = luaL_checkinteger(L, 3);
        luaL_argcheck(L, n > 0, 3, "must be positive");
        s->maxline = (size_t)n;
    } else {
        int v;
        if (options[i].boolean) {
            luaL_checkany(L, 3);
            v = lua_isboolean(L, 3) ? lua_toboolean(L, 3) : (int)luaL_checkinteger(L, 3) != 0;
        } else {
            lua_Integer n = luaL_checkinteger(L, 3);
            luaL_argcheck(L, n > 0 && n <= 0x7fffffff, 3, "out of range");
            v = (int)n;
        }
        if (set_int_option(s->io.fd, i, v) < 0) return mw_pusherrno(L, errno);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int h_getoption(lua_State *L)
{
    mw_sock *s = checkany(L, 1);
    int i = find_option(L, 2);
    if (i < 0) {
        lua_pushinteger(L, (lua_Integer)s->maxline);
        return 1;
    }
    int v = 0;
    socklen_t len = sizeof v;
    if (getsockopt(s->io.fd, options[i].level, options[i].opt, &v, &len) < 0)
        return mw_pusherrno(L, errno);
    if (options[i].boolean) lua_pushboolean(L, v != 0);
    else lua_pushinteger(L, v);
    return 1;
}

static int h_settimeout(lua_State *L)
{
    mw_sock *s = checkany(L, 1);
    double timeout = luaL_optnumber(L, 2, -1);
    luaL_argcheck(L, timeout == timeout, 2, "not a number");   /* NaN is no "no timeout" */
    s->timeout = timeout;
    lua_settop(L, 1);
    return 1;
}

static int h_gettimeout(lua_State *L)
{
    mw_sock *s = checkany(L, 1);
    if (s->timeout < 0) lua_pushnil(L);
    else lua_pushnumber(L, s->timeout);
    return 1;
}

static int h_fileno(lua_State *L)
{
    mw_sock *s = checkany(L, 1);
    lua_pushinteger(L, s->io.fd);
    return 1;
}

static int h_tostring(lua_State *L)
{
    mw_sock *s = lua_touserdata(L, 1);
    const char *kind = luaL_testudata(L, 1, MW_LISTENER_MT) ? "Listener" : "Socket";
    if (s->closed) lua_pushfstring(L, "moonwire.%s (closed): %p", kind, (void *)s);
    else lua_pushfstring(L, "moonwire.%s (fd %d): %p", kind, s->io.fd, (void *)s);
    return 1;
}

static int h_shutdown(lua_State *L)
{
    static const char *const hows[] = { "write", "read", "both", NULL };
    static const int how_v[] = { SHUT_WR, SHUT_RD, SHUT_RDWR };
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    int how = luaL_checkoption(L, 2, "write", hows);
    if (how_v[how] != SHUT_RD) {
        if (s->obuf.data) s->rt->sock_output(s, 1);  /* gathered bytes first */
        if (s->tp->shutdown_write) s->tp->shutdown_write(s);
    }
    if (shutdown(s->io.fd, how_v[how]) < 0) return mw_pusherrno(L, errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- accept ------------------------------------------------------------------------- */

static int accept_k(lua_State *L, int status, lua_KContext ctx);

static int accept_step(lua_State *L, mw_sock *l, mw_task *t)
{
    /* the handle exists before the fd does, so a memory error cannot leak the fd */
    mw_sock *s = mw_sock_new(L, l->rt, MW_SOCK_MT);
    for (;;) {
        int fd = accept4(l->io.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            s->family = l->family;
            s->maxline = l->maxline;          /* (set on the listener: its connections' limit) */
            if (l->family != AF_UNIX) set_int_option(fd, 0, 1);  /* nodelay */
            if (mw_sock_open(s, fd) < 0) return mw_pusherrno(L, errno);
            if (l->on_accept) {
                /* e.g. a TLS listener: the handshake happens on the connection's first I/O */
                if (l->on_accept(s, l->accept_arg) < 0) {
                    mw_sock_close(s, 0);
                    return mw_pushfail(L, "tls: cannot create a session", "tls");
                }
                lua_getiuservalue(L, 1, 1);
                lua_setiuservalue(L, -2, 1);  /* the socket keeps what the hook uses alive */
            }
            return mw_sched_checkpoint(L, t, 1);
        }
        if (errno == EINTR || errno == ECONNABORTED) continue;
        int e = errno;
        lua_pop(L, 1);
        if (e == EAGAIN || e == EWOULDBLOCK)
            return mw_sock_wait(L, l, t, MW_ROLE_READ, EPOLLIN, l->rdeadline, accept_k, 0);
        return mw_pusherrno(L, e);
    }
}

static int accept_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_sock *l = lua_touserdata(L, 1);
    mw_task *t = l->rt->current;
    int why = mw_sched_reason(t);
    (void)status; (void)ctx;
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (l->closed) return mw_pushfail(L, "closed", "closed");
    return accept_step(L, l, t);
}

static int l_accept(lua_State *L)
{
    mw_sock *l = mw_sock_check(L, 1, MW_LISTENER_MT);
    int64_t d = mw_sched_deadline(L, l->rt, 2, l->timeout);
    mw_task *t = mw_sock_claim(L, l, MW_ROLE_READ);
    l->rdeadline = d;
    lua_settop(L, 2);
    lua_checkstack(L, 4);
    return accept_step(L, l, t);
}

/* ---- listen ------------------------------------------------------------------------- */

static int opt_bool(lua_State *L, int t, const char *k, int dflt)
{
    int v = dflt;
    if (lua_getfield(L, t, k) != LUA_TNIL) {
        if (!lua_isboolean(L, -1)) luaL_error(L, "bad option '%s' (boolean expected, got %s)", k, luaL_typename(L, -1));
        v = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

static lua_Integer opt_int(lua_State *L, int t, const char *k, lua_Integer dflt)
{
    lua_Integer v = dflt;
    if (lua_getfield(L, t, k) != LUA_TNIL) {
        int ok;
        v = lua_tointegerx(L, -1, &ok);
        if (!ok) luaL_error(L, "bad option '%s' (integer expected, got %s)", k, luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

static const char *opt_str(lua_State *L, int t, const char *k, const char *dflt)
{
    const char *v = dflt;
    if (lua_getfield(L, t, k) != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "bad option '%s' (string expected, got %s)", k, luaL_typename(L, -1));
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1);  /* the string stays alive: it is held by the options table */
    return v;
}

static double opt_num(lua_State *L, int t, const char *k, double dflt)
{
    double v = dflt;
    if (lua_getfield(L, t, k) != LUA_TNIL) {
        int ok;
        v = lua_tonumberx(L, -1, &ok);
        if (!ok) luaL_error(L, "bad option '%s' (number expected, got %s)", k, luaL_typename(L, -1));
        if (v != v) luaL_error(L, "bad option '%s' (not a number)", k);   /* NaN is no "no timeout" */
    }
    lua_pop(L, 1);
    return v;
}

/* Binds and listens the fd; on failure closes it and pushes the failure (returns > 0). */
static int bind_listen(lua_State *L, mw_sock *l, int fd, const struct sockaddr *sa, socklen_t len, int backlog)
{
    /* backlog < 0: bind only (reserves a port for SO_REUSEPORT workers) */
    if (bind(fd, sa, len) < 0 || (backlog >= 0 && listen(fd, backlog) < 0)) {
        int e = errno;
        close(fd);
        return mw_pusherrno(L, e);
    }
    if (mw_sock_open(l, fd) < 0) return mw_pusherrno(L, errno);
    return 0;
}

static int tcp_listen(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *host = opt_str(L, 1, "host", "127.0.0.1");
    lua_Integer port = opt_int(L, 1, "port", 0);
    lua_Integer backlog = opt_int(L, 1, "backlog", 511);
    int reuseaddr = opt_bool(L, 1, "reuseaddr", 1);
    int reuseport = opt_bool(L, 1, "reuseport", 0);
    int do_listen = opt_bool(L, 1, "listen", 1);
    lua_getfield(L, 1, "ipv6only");
    int v6only = lua_isnil(L, -1) ? -1 : lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (port < 0 || port > 65535) luaL_error(L, "bad option 'port' (out of range)");
    if (strcmp(host, "*") == 0) host = "0.0.0.0";

    struct addrinfo hints, *res = NULL;
    char service[16];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(service, sizeof service, "%d", (int)port);
    int gerr = getaddrinfo(host, service, &hints, &res);
    if (gerr) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", host, gai_strerror(gerr));
        lua_pushliteral(L, "dns");
        return 3;
    }
    mw_sock *l = mw_sock_new(L, rt, MW_LISTENER_MT);
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        freeaddrinfo(res);
        return mw_pusherrno(L, e);
    }
    l->family = res->ai_family;
    if (reuseaddr) set_int_option(fd, 2, 1);
    if (reuseport) set_int_option(fd, 3, 1);
    if (v6only >= 0 && res->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only);
    struct sockaddr_storage ss;
    socklen_t len = res->ai_addrlen;
    memcpy(&ss, res->ai_addr, len);
    freeaddrinfo(res);
    int r = bind_listen(L, l, fd, (struct sockaddr *)&ss, len, do_listen ? (int)backlog : -1);
    if (r) return r;
    l->timeout = opt_num(L, 1, "timeout", -1);
    return 1;
}

/* Whether a listening socket is bound to `path`, from /proc/net/unix (a connect probe
 * would show the live listener a spurious connection). When unsure, says yes. */
static int unix_path_listening(const char *path)
{
    FILE *f = fopen("/proc/net/unix", "re");
    if (!f) return 1;
    char line[4096 + 128];
    size_t plen = strlen(path);
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        size_t n = strlen(line);
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
        if (n <= plen || strcmp(line + n - plen, path) != 0 || line[n - plen - 1] != ' ') continue;
        unsigned long num, refs, proto, flags;
        if (sscanf(line, "%lx: %lx %lx %lx", &num, &refs, &proto, &flags) == 4 && (flags & 0x10000))
            found = 1;  /* __SO_ACCEPTCON: it listens */
    }
    fclose(f);
    return found;
}

static int unix_listen(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    if (lua_type(L, 1) == LUA_TSTRING) {  /* unix.listen(path) shorthand */
        lua_createtable(L, 0, 1);
        lua_pushvalue(L, 1);
        lua_setfield(L, -2, "path");
        lua_replace(L, 1);
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "path");
    size_t plen;
    const char *path = lua_tolstring(L, -1, &plen);
    if (!path || plen == 0) luaL_error(L, "bad option 'path' (non-empty string expected)");
    lua_pop(L, 1);
    lua_Integer backlog = opt_int(L, 1, "backlog", 511);
    int unlink_stale = opt_bool(L, 1, "unlink", 1);
    struct sockaddr_un a;
    socklen_t len;
    if (unix_addr(path, plen, &a, &len) < 0) return mw_pusherrno(L, ENAMETOOLONG);
    if (unlink_stale && path[0] != '@') {
        /* stale only if nobody accepts on it: never take a live listener's path */
        struct stat st;
        if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode) && !unix_path_listening(path))
            unlink(path);
    }
    mw_sock *l = mw_sock_new(L, rt, MW_LISTENER_MT);
    l->family = AF_UNIX;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return mw_pusherrno(L, errno);
    int r = bind_listen(L, l, fd, (struct sockaddr *)&a, len, (int)backlog);
    if (r) return r;
    l->timeout = opt_num(L, 1, "timeout", -1);
    return 1;
}

/* ---- connect ------------------------------------------------------------------------ */

/* The addresses a connect tries in turn, with the options to apply; a userdata on the
 * connecting task's stack (index 5), so nothing leaks if the task is cancelled. */
typedef struct {
    int n, cur;
    int nodelay, keepalive, lasterr;
    socklen_t locallen;                  /* > 0: bind to `local` before connecting */
    struct sockaddr_storage local;
    struct { socklen_t len; struct sockaddr_storage sa; } a[];
} addrs_t;

#define CONN_SOCK 4
#define CONN_ADDRS 5

static addrs_t *push_addrs(lua_State *L, int n)
{
    addrs_t *a = lua_newuserdatauv(L, sizeof *a + (size_t)n * sizeof a->a[0], 0);
    memset(a, 0, sizeof *a);
    a->n = n;
    a->lasterr = ECONNREFUSED;
    return a;
}

static int connect_k(lua_State *L, int status, lua_KContext ctx);
static void local_opts(lua_State *L, addrs_t *a);

static int connect_next(lua_State *L, mw_sock *s, mw_task *t, addrs_t *a)
{
    while (a->cur < a->n) {
        int i = a->cur++;
        int fam = a->a[i].sa.ss_family;
        int fd = socket(fam, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) { a->lasterr = errno; continue; }
        if (fam != AF_UNIX) {
            if (a->nodelay) set_int_option(fd, 0, 1);
            if (a->keepalive) set_int_option(fd, 1, 1);
        }
        if (a->locallen > 0) {
            if (a->local.ss_family != fam) { a->lasterr = EAFNOSUPPORT; close(fd); continue; }
            set_int_option(fd, 2, 1);
            if (bind(fd, (struct sockaddr *)&a->local, a->locallen) < 0) {
                a->lasterr = errno;
                close(fd);
                continue;
            }
        }
        s->family = fam;
        int r = connect(fd, (struct sockaddr *)&a->a[i].sa, a->a[i].len);
        if (r < 0 && errno != EINPROGRESS) {
            a->lasterr = errno == EAGAIN ? ECONNREFUSED : errno;
            close(fd);
            continue;
        }
        if (mw_sock_open(s, fd) < 0) { a->lasterr = errno; continue; }
        if (r == 0) {
            lua_pushvalue(L, CONN_SOCK);
            return 1;
        }
        return mw_sock_wait(L, s, t, MW_ROLE_WRITE, EPOLLOUT, s->wdeadline, connect_k, 0);
    }
    return mw_pusherrno(L, a->lasterr);
}

static int connect_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_sock *s = lua_touserdata(L, CONN_SOCK);
    addrs_t *a = lua_touserdata(L, CONN_ADDRS);
    mw_task *t = s->rt->current;
    int why = mw_sched_reason(t);
    (void)status; (void)ctx;
    if (why != MW_WAKE_READY) {
        mw_sock_close(s, 0);
        return mw_sched_pushwake(L, why);
    }
    int err = 0;
    socklen_t len = sizeof err;
    if (s->closed) return mw_pushfail(L, "closed", "closed");
    if (getsockopt(s->io.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err == 0) {
        lua_pushvalue(L, CONN_SOCK);
        return 1;
    }
    a->lasterr = err;
    mw_sock_close(s, 0);
    return connect_next(L, s, t, a);
}

static int connect_dns_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_sock *s = lua_touserdata(L, CONN_SOCK);
    mw_dnsjob *j = *(mw_dnsjob **)lua_touserdata(L, CONN_ADDRS);
    mw_task *t = s->rt->current;
    int why = mw_sched_reason(t);
    (void)status;
    if (why != MW_WAKE_READY) return mw_sched_pushwake(L, why);
    if (j->err) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", j->host, j->err == EAI_SYSTEM ? "resolver unavailable" : gai_strerror(j->err));
        lua_pushliteral(L, "dns");
        return 3;
    }
    int n = 0;
    for (struct addrinfo *ai = j->res; ai; ai = ai->ai_next)
        if (ai->ai_family == AF_INET || ai->ai_family == AF_INET6) n++;
    addrs_t *a = push_addrs(L, n);
    a->nodelay = (int)(ctx & 1);
    a->keepalive = (int)((ctx >> 1) & 1);
    local_opts(L, a);
    int i = 0;
    for (struct addrinfo *ai = j->res; ai; ai = ai->ai_next) {
        if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
        memcpy(&a->a[i].sa, ai->ai_addr, ai->ai_addrlen);
        a->a[i].len = ai->ai_addrlen;
        i++;
    }
    lua_replace(L, CONN_ADDRS);
    if (n == 0) return mw_pushfail(L, "no address", "dns");
    return connect_next(L, s, t, a);
}

/* Reads the connect options table at 3: timeout, nodelay, keepalive. */
static void connect_opts(lua_State *L, double *timeout, int *nodelay, int *keepalive)
{
    *timeout = -1;
    *nodelay = 1;
    *keepalive = 0;
    if (lua_isnoneornil(L, 3)) return;
    luaL_checktype(L, 3, LUA_TTABLE);
    *timeout = opt_num(L, 3, "timeout", -1);
    *nodelay = opt_bool(L, 3, "nodelay", 1);
    *keepalive = opt_bool(L, 3, "keepalive", 0);
}

/* Applies the local_host/local_port options (literal addresses only) to a. */
static void local_opts(lua_State *L, addrs_t *a)
{
    if (!lua_istable(L, 3)) return;
    const char *host = opt_str(L, 3, "local_host", NULL);
    lua_Integer port = opt_int(L, 3, "local_port", 0);
    if (!host && port == 0) return;
    if (port < 0 || port > 65535) luaL_error(L, "bad option 'local_port' (out of range)");
    if (!host) host = "0.0.0.0";
    struct sockaddr_in *s4 = (struct sockaddr_in *)&a->local;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&a->local;
    if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        a->locallen = sizeof *s4;
    } else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        a->locallen = sizeof *s6;
    } else {
        luaL_error(L, "bad option 'local_host' (IP address expected, got '%s')", host);
    }
}

static int tcp_connect(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    const char *host = luaL_checkstring(L, 1);
    lua_Integer port = luaL_checkinteger(L, 2);
    luaL_argcheck(L, port > 0 && port <= 65535, 2, "port out of range");
    double timeout;
    int nodelay, keepalive;
    connect_opts(L, &timeout, &nodelay, &keepalive);
    mw_task *t = mw_sched_self(L, rt);
    lua_settop(L, 3);
    mw_sock *s = mw_sock_new(L, rt, MW_SOCK_MT);
    s->wdeadline = mw_sched_after(rt, timeout);

    struct in6_addr a6;
    struct in_addr a4;
    const char *h = host;
    char tmp[INET6_ADDRSTRLEN + 2];
    size_t hl = strlen(host);
    if (hl > 2 && host[0] == '[' && host[hl - 1] == ']' && hl - 2 < sizeof tmp) {
        memcpy(tmp, host + 1, hl - 2);
        tmp[hl - 2] = '\0';
        h = tmp;
    }
    if (inet_pton(AF_INET, h, &a4) == 1) {
        addrs_t *a = push_addrs(L, 1);
        struct sockaddr_in *sa = (struct sockaddr_in *)&a->a[0].sa;
        sa->sin_family = AF_INET;
        sa->sin_port = htons((uint16_t)port);
        sa->sin_addr = a4;
        a->a[0].len = sizeof *sa;
        a->nodelay = nodelay;
        a->keepalive = keepalive;
        local_opts(L, a);
        return connect_next(L, s, t, a);
    }
    if (inet_pton(AF_INET6, h, &a6) == 1) {
        addrs_t *a = push_addrs(L, 1);
        struct sockaddr_in6 *sa = (struct sockaddr_in6 *)&a->a[0].sa;
        sa->sin6_family = AF_INET6;
        sa->sin6_port = htons((uint16_t)port);
        sa->sin6_addr = a6;
        a->a[0].len = sizeof *sa;
        a->nodelay = nodelay;
        a->keepalive = keepalive;
        local_opts(L, a);
        return connect_next(L, s, t, a);
    }
    mw_dnsjob *j = mw_dns_push(L, rt, host, (int)port, AF_UNSPEC);
    if (!j) return luaL_error(L, "not enough memory");
    return mw_dns_wait(L, t, j, s->wdeadline, connect_dns_k, (lua_KContext)(nodelay | (keepalive << 1)));
}

static int unix_connect(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    size_t plen;
    const char *path = luaL_checklstring(L, 1, &plen);
    luaL_argcheck(L, plen > 0, 1, "empty path");
    double timeout;
    int nodelay, keepalive;
    lua_settop(L, 2);
    lua_pushnil(L);
    lua_insert(L, 2);  /* options move to index 3, as for tcp.connect */
    connect_opts(L, &timeout, &nodelay, &keepalive);
    mw_task *t = mw_sched_self(L, rt);
    lua_settop(L, 3);
    mw_sock *s = mw_sock_new(L, rt, MW_SOCK_MT);
    s->wdeadline = mw_sched_after(rt, timeout);
    addrs_t *a = push_addrs(L, 1);
    if (unix_addr(path, plen, (struct sockaddr_un *)&a->a[0].sa, &a->a[0].len) < 0)
        return mw_pusherrno(L, ENAMETOOLONG);
    return connect_next(L, s, t, a);
}

/* socketpair() -> sock, sock: a connected pair of Unix stream sockets */
static int l_socketpair(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    mw_sock *a = mw_sock_new(L, rt, MW_SOCK_MT);
    mw_sock *b = mw_sock_new(L, rt, MW_SOCK_MT);
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0)
        return mw_pusherrno(L, errno);
    a->family = b->family = AF_UNIX;
    if (mw_sock_open(a, fds[0]) < 0) {
        int e = errno;
        close(fds[1]);
        return mw_pusherrno(L, e);
    }
    if (mw_sock_open(b, fds[1]) < 0) return mw_pusherrno(L, errno);
    return 2;
}

/* ---- registration ------------------------------------------------------------------- */

static void new_type(lua_State *L, const char *mt, const luaL_Reg *own)
{
    static const luaL_Reg common[] = {
        { "close", h_close }, { "getsockname", h_getsockname }, { "setoption", h_setoption },
        { "getoption", h_getoption }, { "settimeout", h_settimeout },
        { "gettimeout", h_gettimeout }, { "fileno", h_fileno }, { NULL, NULL }
    };
    luaL_newmetatable(L, mt);
    lua_newtable(L);
    luaL_setfuncs(L, common, 0);
    luaL_setfuncs(L, own, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, h_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, h_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, h_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
}

void mw_net_open(lua_State *L, int rtidx)
{
    static const luaL_Reg sock_own[] = {
        { "getpeername", h_getpeername }, { "shutdown", h_shutdown },
        { NULL, NULL }
    };
    static const luaL_Reg listener_own[] = { { "accept", l_accept }, { NULL, NULL } };
    static const luaL_Reg tcp[] = { { "listen", tcp_listen }, { "connect", tcp_connect }, { NULL, NULL } };
    static const luaL_Reg unx[] = {
        { "listen", unix_listen }, { "connect", unix_connect }, { "pair", l_socketpair }, { NULL, NULL }
    };
    mw_rt *rt = lua_touserdata(L, rtidx);
    rt->after_poll = run_fired;
    rt->after_run = unwatch_all;
    new_type(L, MW_SOCK_MT, sock_own);
    new_type(L, MW_LISTENER_MT, listener_own);
    lua_newtable(L);
    lua_pushvalue(L, rtidx);
    luaL_setfuncs(L, tcp, 1);
    lua_setfield(L, -2, "tcp");
    lua_newtable(L);
    lua_pushvalue(L, rtidx);
    luaL_setfuncs(L, unx, 1);
    lua_setfield(L, -2, "unix");
    lua_pushcfunction(L, l_watch);
    lua_setfield(L, -2, "watch");
    lua_pushcfunction(L, l_unwatch);
    lua_setfield(L, -2, "unwatch");
    luaL_getmetatable(L, MW_SOCK_MT);
    lua_pushcclosure(L, l_rewatch, 1);
    lua_setfield(L, -2, "rewatch");
}
