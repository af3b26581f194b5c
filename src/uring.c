/* uring: one buffer to many sockets in one io_uring_enter (see uring.h). The ring is set up
 * with raw system calls (no liburing: Debian 12's is not installed with the build deps);
 * when io_uring_setup fails (an old kernel, io_uring_disabled, a seccomp filter) the holder
 * remembers it and every call returns -1, so the caller's send(2) loop does the work. */
#define _GNU_SOURCE
#include "uring.h"

#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>
#include <lauxlib.h>

#define URING_MT "moonwire.Uring"

struct mw_uring {
    int fd;                     /* -1: no ring (yet) */
    int off;                    /* io_uring unusable here, or turned off */
    pid_t pid;                  /* the process that made the ring (a forked child remakes it) */
    void *sq_map, *cq_map, *sqe_map;
    size_t sq_len, cq_len, sqe_len;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static void ring_free(mw_uring *u, int close_fd)
{
    if (u->sq_map) munmap(u->sq_map, u->sq_len);
    if (u->cq_map) munmap(u->cq_map, u->cq_len);
    if (u->sqe_map) munmap(u->sqe_map, u->sqe_len);
    u->sq_map = u->cq_map = u->sqe_map = NULL;
    if (u->fd >= 0 && close_fd) close(u->fd);
    u->fd = -1;
}

static int ring_setup(mw_uring *u)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int fd = (int)syscall(__NR_io_uring_setup, MW_URING_BATCH, &p);
    if (fd < 0) return -1;
    u->fd = fd;
    u->pid = getpid();
    u->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    u->sqe_len = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sq_map = mmap(NULL, u->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    u->cq_map = mmap(NULL, u->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    u->sqe_map = mmap(NULL, u->sqe_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (u->sq_map == MAP_FAILED) u->sq_map = NULL;
    if (u->cq_map == MAP_FAILED) u->cq_map = NULL;
    if (u->sqe_map == MAP_FAILED) u->sqe_map = NULL;
    if (!u->sq_map || !u->cq_map || !u->sqe_map) {
        ring_free(u, 1);
        return -1;
    }
    char *sq = u->sq_map, *cq = u->cq_map;
    u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(sq + p.sq_off.array);
    u->cq_head = (unsigned *)(cq + p.cq_off.head);
    u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    u->sqes = u->sqe_map;
    return 0;
}

static int uring_gc(lua_State *L)
{
    mw_uring *u = luaL_checkudata(L, 1, URING_MT);
    /* (a ring inherited over fork is the parent's: unmap it, leave its descriptor alone) */
    ring_free(u, u->pid == getpid());
    return 0;
}

mw_uring *mw_uring_push(lua_State *L)
{
    mw_uring *u = lua_newuserdatauv(L, sizeof *u, 0);
    memset(u, 0, sizeof *u);
    u->fd = -1;
    if (luaL_newmetatable(L, URING_MT)) {
        lua_pushcfunction(L, uring_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return u;
}

int mw_uring_enable(mw_uring *u, int on)
{
    int was = !u->off;
    if (on >= 0) u->off = !on;
    return was;
}

int mw_uring_made(const mw_uring *u)
{
    return u->fd >= 0 && u->pid == getpid();
}

/* Takes the completions of `want` submitted sends (user_data: their index). Returns 0, or -1
 * when waiting for them failed. */
static int reap(mw_uring *u, unsigned want, ssize_t *res)
{
    unsigned got = 0;
    while (got < want) {
        unsigned head = *u->cq_head;
        unsigned tail = atomic_load_explicit((_Atomic unsigned *)u->cq_tail, memory_order_acquire);
        for (; head != tail; head++, got++) {
            struct io_uring_cqe *c = &u->cqes[head & *u->cq_mask];
            res[c->user_data] = c->res;
        }
        atomic_store_explicit((_Atomic unsigned *)u->cq_head, head, memory_order_release);
        if (got < want) {
            /* (a send handed to a worker: MSG_DONTWAIT makes it quick) */
            int r = (int)syscall(__NR_io_uring_enter, u->fd, 0, want - got, IORING_ENTER_GETEVENTS, NULL, 0);
            if (r < 0 && errno != EINTR) return -1;
        }
    }
    return 0;
}

int mw_uring_send_many(mw_uring *u, const int *fds, int n, const void *buf, size_t len, ssize_t *res)
{
    if (u->off || n <= 0 || n > MW_URING_BATCH) return 0;
    if (u->fd >= 0 && u->pid != getpid()) ring_free(u, 0);    /* forked: the parent's ring */
    if (u->fd < 0 && ring_setup(u) < 0) {
        u->off = 1;
        return 0;
    }
    unsigned tail = *u->sq_tail;
    for (int i = 0; i < n; i++) {
        unsigned idx = (tail + (unsigned)i) & *u->sq_mask;
        struct io_uring_sqe *e = &u->sqes[idx];
        memset(e, 0, sizeof *e);
        e->opcode = IORING_OP_SEND;
        e->fd = fds[i];
        e->addr = (unsigned long)buf;
        e->len = (unsigned)len;
        e->msg_flags = MSG_NOSIGNAL | MSG_DONTWAIT;
        e->user_data = (unsigned long)i;
        u->sq_array[idx] = idx;
        res[i] = -EIO;          /* (a completion never reaped: the member is failed, not guessed) */
    }
    atomic_store_explicit((_Atomic unsigned *)u->sq_tail, tail + (unsigned)n, memory_order_release);
    int r;
    do r = (int)syscall(__NR_io_uring_enter, u->fd, n, n, IORING_ENTER_GETEVENTS, NULL, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0) r = 0;
    if (r < n) {
        /* what the kernel did not take is taken back: the caller sends those itself.
         * (r < 0 or short: not expected for sends; then io_uring is dropped for good) */
        atomic_store_explicit((_Atomic unsigned *)u->sq_tail, tail + (unsigned)r, memory_order_release);
        u->off = 1;
    }
    if (reap(u, (unsigned)r, res) < 0) {
        u->off = 1;
        ring_free(u, 1);
    }
    return r;
}
