/* net: socket handles (listeners and byte streams, TCP and Unix): creating, connecting,
 * accepting, options, closing, watches, and the plain transport. The buffered stream that
 * sits on a socket (stream.h) registers itself from above: its methods, its before-poll
 * flush and its output hook (rt->sock_output); net calls none of its symbols. A stream
 * reads and writes through a transport (plain socket calls here; TLS slots in beside it),
 * so read/recv/write/accept exist once for every kind. */
#ifndef MW_NET_H
#define MW_NET_H

#include <sys/types.h>
#include <sys/uio.h>

#include "sched.h"

#define MW_SOCK_MT "moonwire.Socket"
#define MW_LISTENER_MT "moonwire.Listener"
/* their magic numbers (mw_sock.magic; see mw_udata_magic in mwlua.h) */
#define MW_SOCK_MAGIC UINT64_C(0x6d77736f636b6574)       /* "mwsocket" */
#define MW_LISTENER_MAGIC UINT64_C(0x6d776c697374656e)   /* "mwlisten" */

typedef struct mw_sock mw_sock;

/* A transport moves bytes for a stream. Both calls return a byte count (read: 0 at end of
 * stream) or -1 with errno set; on EAGAIN they set *want to the readiness to wait for
 * (EPOLLIN or EPOLLOUT: TLS may need to write in order to read). */
typedef struct mw_transport {
    ssize_t (*read)(mw_sock *s, char *buf, size_t len, uint32_t *want);
    ssize_t (*writev)(mw_sock *s, const struct iovec *iov, int n, uint32_t *want);
    void (*close)(mw_sock *s);             /* before the fd closes; may be NULL */
    int (*pending)(mw_sock *s);            /* bytes read from the fd, not yet returned; may be NULL */
    const char *(*errmsg)(mw_sock *s);     /* the reason of the last EPROTO; may be NULL */
    /* gives back the transport's buffers now if none holds unread or unsent bytes; then
     * hold = 1 keeps them between calls (a busy connection: no allocation per record), 0
     * gives them back after each call (the default: an idle connection holds none); may be NULL */
    void (*trim)(mw_sock *s, int hold);
    /* before the fd's write side shuts (s:shutdown "write" or "both"): the transport ends its
     * own stream first (TLS: close_notify, RFC 8446 §6.1), never waiting; may be NULL */
    void (*shutdown_write)(mw_sock *s);
} mw_transport;

enum { MW_ROLE_READ, MW_ROLE_WRITE };

struct mw_sock {
    mw_io io;
    uint64_t magic;            /* which kind (mw_sock_check): socket or listener */
    mw_rt *rt;
    mw_task *waiter[2];        /* the reading and the writing task, when parked */
    uint32_t want[2];          /* readiness each of them waits for (read: also a watch) */
    int family;                /* AF_INET, AF_INET6, AF_UNIX */
    int closed, eof;
    /* plain reads: rready is 0 once a read came back short (the kernel queue was drained)
     * and set again by the next readable event, so a drained socket costs no EAGAIN call;
     * rdhup: the peer's FIN was seen, so a short read may be followed by the end. */
    unsigned char rready, rdhup;
    double timeout;            /* default timeout (s), < 0: none */
    size_t maxline, scan;      /* line limit; bytes of the buffer known to hold no '\n' */
    int64_t rdeadline, wdeadline;
    int64_t last_rx;           /* loop clock (ns) of the last read that brought bytes, 0: none */
    mw_buf rbuf;
    const mw_transport *tp;
    void *tls;                 /* the transport's session state (TLS) */
    /* listeners: called on every accepted socket (a TLS listener attaches its session) */
    int (*on_accept)(mw_sock *s, void *arg);
    void *accept_arg;
    /* a watch (core.watch): fn, arg in uservalues 2 and 3, dispatched to a worker when the
     * socket is readable while armed; watch_ref anchors the handle (LUA_NOREF: none) */
    int watch_ref;
    int armed;
    mw_sock *wprev, *wnext;    /* rt->watching */
    /* the watch fired in the loop's current batch: queued on rt->fired, run after it */
    int fired;
    mw_sock *fprev, *fnext;
    /* output buffer: small responses to pipelined requests are gathered here and written
     * once, before the loop polls (rt->dirty) or before the next write of any kind */
    mw_buf obuf;
    int dirty;
    mw_sock *dprev, *dnext;    /* rt->dirty */
};

extern const mw_transport mw_plain_transport;

/* recv on the socket's descriptor, keeping the drained-socket bookkeeping (rready): -1 with
 * EAGAIN, without a syscall, when the last read found the socket drained. For transports. */
ssize_t mw_sock_recv(mw_sock *s, char *buf, size_t len);

/* Pushes a new handle in the closed state with metatable `mt`. */
mw_sock *mw_sock_new(lua_State *L, mw_rt *rt, const char *mt);
/* Opens a closed handle on fd (registers it with the loop); 0, or -1 with errno (fd closed). */
int mw_sock_open(mw_sock *s, int fd);
/* Closes the handle; with `wake`, parked tasks get nil, "closed". Idempotent. */
void mw_sock_close(mw_sock *s, int wake);
/* The handle at idx (either type); raises if it is not one or it is closed. */
mw_sock *mw_sock_check(lua_State *L, int idx, const char *mt);
/* The running task, after checking that no other task is parked on s for `role`
 * (raises "socket already has a reading task" / "... writing task"). */
mw_task *mw_sock_claim(lua_State *L, mw_sock *s, int role);
/* Parks the running task t on s for `role` until `want` readiness (or a wake). */
int mw_sock_wait(lua_State *L, mw_sock *s, mw_task *t, int role, uint32_t want,
                 int64_t deadline, lua_KFunction k, lua_KContext ctx);

/* Registers tcp, unix, watch/unwatch/rewatch and the Socket and Listener types. */
void mw_net_open(lua_State *L, int rtidx);

#endif
