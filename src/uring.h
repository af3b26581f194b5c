/* uring: one buffer sent to many sockets with one io_uring_enter (IORING_OP_SEND with
 * MSG_DONTWAIT: each send is tried at once and never waits, as send(2) with the same flags).
 * Where a system call is expensive (virtual machines that trap every syscall) this saves
 * most of a broadcast's per-member cost. Knows nothing of Lua beyond owning its ring in a
 * userdata (one per Lua state, made on first use, remade after a fork). */
#ifndef MW_URING_H
#define MW_URING_H

#include <lua.h>
#include <sys/types.h>

/* sends per io_uring_enter */
#define MW_URING_BATCH 256

typedef struct mw_uring mw_uring;

/* Pushes a ring holder (a userdata; no ring yet: made on first use). */
mw_uring *mw_uring_push(lua_State *L);

/* Turns the use of io_uring off (0) or on (1) for this holder (tests run both ways; -1:
 * leaves it); returns whether it was on (off too once io_uring proved unusable here). */
int mw_uring_enable(mw_uring *u, int on);

/* Whether this process's ring exists (one descriptor, kept once made). */
int mw_uring_made(const mw_uring *u);

/* Sends buf[0, len) to the descriptors fds[0, n) (n <= MW_URING_BATCH) and returns how many
 * of them it took, k (0 when io_uring is off or cannot be used here): for i < k, res[i] is
 * the bytes that socket took, or -errno (-EAGAIN: none, its buffer is full). The caller
 * sends to fds[k, n) itself. */
int mw_uring_send_many(mw_uring *u, const int *fds, int n, const void *buf, size_t len, ssize_t *res);

#endif
