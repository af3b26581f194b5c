/* loop: the epoll event loop, the timer heap and the cached monotonic clock.
 * It knows nothing of Lua: handles carry a callback, timers carry a callback, and the
 * loop calls them. Callbacks must not run Lua code that could free a handle: they only
 * record readiness and queue work (the scheduler runs tasks between polls). */
#ifndef MW_LOOP_H
#define MW_LOOP_H

#include <stdint.h>
#include <sys/epoll.h>

typedef struct mw_loop mw_loop;
typedef struct mw_io mw_io;
typedef struct mw_timer mw_timer;

/* A file descriptor registered once, edge-triggered, for in and out. `ready` caches the
 * readiness seen so far; I/O code clears a bit when a syscall answers EAGAIN. */
struct mw_io {
    int fd;
    uint32_t events;              /* readiness bits (EPOLLIN/OUT/ERR/HUP/RDHUP) seen */
    void (*on_event)(mw_io *io, uint32_t events);
};

struct mw_timer {
    int64_t when;                 /* deadline, ns on the loop clock */
    int index;                    /* place in the heap, -1 when not armed */
    void (*on_fire)(mw_timer *t);
};

struct mw_loop {
    int epfd;
    int64_t now;                  /* cached clock, ns, updated once per iteration */
    mw_timer **heap;
    int nheap, capheap;
};

/* Opens the epoll instance; returns 0 or -1 with errno set. */
int mw_loop_init(mw_loop *lp);
void mw_loop_free(mw_loop *lp);

/* Registers io->fd for EPOLLIN|EPOLLOUT|EPOLLRDHUP edge-triggered; 0 or -1/errno. */
int mw_loop_add(mw_loop *lp, mw_io *io);
/* Removes io->fd from epoll (before close, so a dup'd fd leaves no stale event). */
void mw_loop_del(mw_loop *lp, mw_io *io);

/* Monotonic clock read now (not cached), ns. */
int64_t mw_loop_clock(void);
void mw_loop_update(mw_loop *lp);

void mw_timer_init(mw_timer *t, void (*on_fire)(mw_timer *t));
/* Arms (or re-arms) t for absolute time `when`; 0 or -1 on memory exhaustion. */
int mw_timer_start(mw_loop *lp, mw_timer *t, int64_t when);
void mw_timer_stop(mw_loop *lp, mw_timer *t);
static inline int mw_timer_armed(const mw_timer *t) { return t->index >= 0; }

/* Waits for events at most until the nearest timer (or forever when there is none and
 * `block` is set; not at all when `block` is 0), dispatches the batch to the io callbacks,
 * then updates the clock. Returns 0, or -1 when epoll_wait itself fails. The batch holds
 * raw handle pointers until the last callback returns: that is why callbacks may not free
 * a handle, nor run Lua (a collection could). */
int mw_loop_poll(mw_loop *lp, int block);
/* Fires the timers that are due on the cached clock (after mw_loop_poll). */
void mw_loop_run_timers(mw_loop *lp);

#endif
