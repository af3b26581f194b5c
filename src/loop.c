/* loop: epoll + binary min-heap of timers + cached monotonic clock. No Lua here.
 * Only a failing epoll_wait ends a poll with an error; everything else is the callbacks'. */
#define _GNU_SOURCE
#include "loop.h"

#include <errno.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define MW_MAX_EVENTS 256

int mw_loop_init(mw_loop *lp)
{
    lp->heap = NULL;
    lp->nheap = lp->capheap = 0;
    lp->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (lp->epfd < 0) return -1;
    lp->now = mw_loop_clock();
    return 0;
}

void mw_loop_free(mw_loop *lp)
{
    if (lp->epfd >= 0) close(lp->epfd);
    lp->epfd = -1;
    free(lp->heap);
    lp->heap = NULL;
    lp->nheap = lp->capheap = 0;
}

int mw_loop_add(mw_loop *lp, mw_io *io)
{
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = io;
    io->events = 0;
    return epoll_ctl(lp->epfd, EPOLL_CTL_ADD, io->fd, &ev);
}

void mw_loop_del(mw_loop *lp, mw_io *io)
{
    struct epoll_event ev = { 0 };
    if (io->fd >= 0) epoll_ctl(lp->epfd, EPOLL_CTL_DEL, io->fd, &ev);
}

int64_t mw_loop_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void mw_loop_update(mw_loop *lp) { lp->now = mw_loop_clock(); }

void mw_timer_init(mw_timer *t, void (*on_fire)(mw_timer *t))
{
    t->when = 0;
    t->index = -1;
    t->on_fire = on_fire;
}

static void heap_set(mw_loop *lp, int i, mw_timer *t)
{
    lp->heap[i] = t;
    t->index = i;
}

static void sift_up(mw_loop *lp, int i)
{
    mw_timer *t = lp->heap[i];
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (lp->heap[parent]->when <= t->when) break;
        heap_set(lp, i, lp->heap[parent]);
        i = parent;
    }
    heap_set(lp, i, t);
}

static void sift_down(mw_loop *lp, int i)
{
    mw_timer *t = lp->heap[i];
    for (;;) {
        int child = 2 * i + 1;
        if (child >= lp->nheap) break;
        if (child + 1 < lp->nheap && lp->heap[child + 1]->when < lp->heap[child]->when)
            child++;
        if (t->when <= lp->heap[child]->when) break;
        heap_set(lp, i, lp->heap[child]);
        i = child;
    }
    heap_set(lp, i, t);
}

int mw_timer_start(mw_loop *lp, mw_timer *t, int64_t when)
{
    if (t->index >= 0) {
        int64_t old = t->when;
        t->when = when;
        if (when < old) sift_up(lp, t->index);
        else sift_down(lp, t->index);
        return 0;
    }
    if (lp->nheap == lp->capheap) {
        int cap = lp->capheap ? lp->capheap * 2 : 64;
        mw_timer **h = realloc(lp->heap, (size_t)cap * sizeof *h);
        if (!h) return -1;
        lp->heap = h;
        lp->capheap = cap;
    }
    t->when = when;
    heap_set(lp, lp->nheap++, t);
    sift_up(lp, t->index);
    return 0;
}

void mw_timer_stop(mw_loop *lp, mw_timer *t)
{
    int i = t->index;
    if (i < 0) return;
    t->index = -1;
    lp->nheap--;
    if (i == lp->nheap) return;
    mw_timer *last = lp->heap[lp->nheap];
    heap_set(lp, i, last);
    if (i > 0 && lp->heap[(i - 1) / 2]->when > last->when) sift_up(lp, i);
    else sift_down(lp, i);
}

void mw_loop_run_timers(mw_loop *lp)
{
    /* A callback may start or stop other timers; re-read the top every time. */
    while (lp->nheap > 0 && lp->heap[0]->when <= lp->now) {
        mw_timer *t = lp->heap[0];
        mw_timer_stop(lp, t);
        t->on_fire(t);
    }
}

int mw_loop_poll(mw_loop *lp, int block)
{
    struct epoll_event evs[MW_MAX_EVENTS];
    struct timespec ts = { 0, 0 }, *tp = &ts;
    if (block) {
        if (lp->nheap == 0) {
            tp = NULL;
        } else {
            int64_t d = lp->heap[0]->when - mw_loop_clock();
            if (d < 0) d = 0;
            ts.tv_sec = d / 1000000000;
            ts.tv_nsec = d % 1000000000;
        }
    }
    /* epoll_pwait2 takes a nanosecond timeout: timers fire on time, not on the next ms */
    int n = epoll_pwait2(lp->epfd, evs, MW_MAX_EVENTS, tp, NULL);
    if (n < 0 && errno == ENOSYS) {
        int ms = tp ? (int)(ts.tv_sec * 1000 + (ts.tv_nsec + 999999) / 1000000) : -1;
        n = epoll_wait(lp->epfd, evs, MW_MAX_EVENTS, ms);
    }
    if (n < 0 && errno != EINTR) return -1;
    for (int i = 0; i < n; i++) {
        mw_io *io = evs[i].data.ptr;
        io->events |= evs[i].events;
        io->on_event(io, evs[i].events);
    }
    mw_loop_update(lp);
    return 0;
}
