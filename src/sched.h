/* sched: tasks (Lua coroutines), the run queue, and the one wait primitive.
 * This is the only place that resumes coroutines. A blocking C function tries its
 * non-blocking step; when it must wait it registers the task with the wait source
 * (a handle, a join list, a resolver job...), then calls mw_sched_wait(), whose
 * continuation retries the same step once the task is woken. */
#ifndef MW_SCHED_H
#define MW_SCHED_H

#include <lua.h>
#include <lauxlib.h>
#include <stdint.h>
#include <signal.h>

#include "loop.h"
#include "buf.h"

#define MW_NO_DEADLINE INT64_MAX

typedef struct mw_rt mw_rt;
typedef struct mw_task mw_task;
typedef struct mw_resolver mw_resolver;
struct mw_sock;

enum { MW_T_READY, MW_T_RUNNING, MW_T_WAITING, MW_T_DONE, MW_T_FAILED };
/* why a waiting task was woken */
enum { MW_WAKE_NONE, MW_WAKE_READY, MW_WAKE_TIMEOUT, MW_WAKE_CANCEL, MW_WAKE_CLOSED };

struct mw_task {
    mw_rt *rt;
    lua_State *co;
    int state;
    int wake;                  /* MW_WAKE_*: set when the task leaves MW_T_WAITING */
    int nargs;                 /* values on co's stack to pass to the next resume */
    int nres;                  /* results left on co's stack when it returned */
    int ref;                   /* registry ref anchoring the userdata while alive */
    int cancel_pending;
    int joined;                /* someone collected (or waited for) the outcome */
    int killed;                /* ended by mw.stop()/end of run, not by itself */
    int streak;                /* I/O calls answered without waiting since the last wait */
    int64_t scope_deadline;    /* nearest mw.timeout deadline, ns */
    mw_timer timer;
    void (*unwait)(mw_task *t); /* detaches the task from its wait source */
    lua_KFunction k;           /* the continuation of the pending wait or requeue */
    lua_KContext kctx;
    void *wait_obj;
    uint64_t wait_tag;         /* the wait source's own tag for this wait (resp.c: the reply slot) */
    mw_task *qnext;            /* run queue */
    mw_task *prev, *next;      /* all live tasks */
    mw_task *wprev, *wnext;    /* a wait list (joiners of another task) */
    mw_task *joiners;
};

struct mw_rt {
    mw_loop loop;
    lua_State *L;              /* the thread that called run() */
    mw_task *current;
    mw_task *runq_head, *runq_tail;
    mw_task *live;             /* list of live tasks */
    int nlive;
    int running, stopping;
    unsigned runs;             /* run() calls so far: a mark left by an earlier run is stale */
    /* set while the loop dispatches a batch of events (loop.h: no Lua may run then, since a
     * collection could free a handle the batch still points to). mw_sched_dispatch and
     * spawn abort when it is set: the rule is checked, not left to care. */
    int in_batch;
    mw_task *main;
    mw_buf_pool pool;
    /* workers: tasks that run a watch's function (mw_sched_dispatch) and then wait, idle,
     * for the next one instead of ending, so a watch that fires costs no new coroutine */
    mw_task *idle;             /* idle workers (a stack, linked by wnext/wprev) */
    int nidle;
    int worker_ref;            /* registry ref of the worker's body (a C closure) */
    /* sockets with a watch armed (net.c): they keep the loop running as a task would */
    struct mw_sock *watching;
    struct mw_sock *fired;     /* watches that fired in the current batch, not yet run */
    int nwatch;
    /* sockets whose output buffer holds bytes to write before the loop polls (net.c) */
    struct mw_sock *dirty;
    /* set by the net layer (sched does not know sockets): writes the dirty sockets' output
     * before each poll; runs the watches that fired in the poll's batch once the batch is
     * over; drops every watch at the end of run() */
    void (*before_poll)(mw_rt *rt);
    void (*after_poll)(mw_rt *rt);
    /* set by the stream layer: a socket with gathered output became writable (closing 0)
     * or is being closed or shut down (closing 1); net calls it, knowing no stream */
    void (*sock_output)(struct mw_sock *s, int closing);
    void (*after_run)(mw_rt *rt, lua_State *L);
    mw_resolver *resolver;
    void (*resolver_free)(mw_resolver *r);  /* set by the dns layer with the resolver */
    /* signals */
    mw_io sigio;
    sigset_t sigset;           /* signals routed to the signalfd */
    sigset_t oldmask;          /* the thread's mask before we blocked anything */
    int sigmask_saved;
    uint64_t sigpending;       /* bit n: signal n arrived, handler not yet spawned */
};

/* The runtime of this lua_State; functions registered by the core have it as upvalue 1. */
#define mw_rt_up(L) ((mw_rt *)lua_touserdata((L), lua_upvalueindex(1)))

/* Registers the task functions and the Task metatable into the table on top. */
void mw_sched_open(lua_State *L, int rtidx);
mw_rt *mw_sched_newruntime(lua_State *L);

/* The running task whose thread is L; raises "blocking call outside a task" otherwise. */
mw_task *mw_sched_self(lua_State *L, mw_rt *rt);

/* Parks the running task until a wake; then calls k(L, LUA_YIELD, ctx), where
 * mw_sched_reason() tells why. `deadline` is absolute (ns, loop clock) or MW_NO_DEADLINE;
 * the enclosing mw.timeout deadline applies too. The caller has registered the task
 * with its source (t->unwait, t->wait_obj) before calling. */
int mw_sched_wait(lua_State *L, mw_task *t, int64_t deadline, lua_KFunction k, lua_KContext ctx);
/* Whether a wait given `deadline` (and the task's mw.timeout scope) would have timed out by
 * now. A read loop that finds bytes every time never waits: it asks this between reads, so
 * a peer that always has data waiting cannot outlast a timeout. Reads the clock. */
int mw_sched_expired(mw_task *t, int64_t deadline);
/* Puts the running task at the back of the run queue and yields; k(L, LUA_YIELD, ctx)
 * runs on its next turn (mw_sched_reason() gives MW_WAKE_NONE). */
int mw_sched_requeue(lua_State *L, mw_task *t, lua_KFunction k, lua_KContext ctx);
/* Returns nres, but after MW_STREAK_MAX calls in a row that did not wait it first lets the
 * other ready tasks run, so one fast peer cannot starve the rest. */
#define MW_STREAK_MAX 64
int mw_sched_checkpoint(lua_State *L, mw_task *t, int nres);

/* Runs fn(arg), the two values on top of L (popped), in a task: an idle worker when there
 * is one, else a new worker. Never yields. It may allocate (and so collect): never call it
 * from an event callback (aborts inside a batch); queue the work for after_poll instead. */
void mw_sched_dispatch(mw_rt *rt, lua_State *L);
/* The same for fn and the nargs values after it; returns the worker's task. */
mw_task *mw_sched_dispatch_n(mw_rt *rt, lua_State *L, int nargs);

/* task:cancel(): a waiting task's pending call fails with "cancelled" now, a running one's
 * next blocking call does; 0 when the task is over (nothing to cancel). */
int mw_sched_cancel(mw_task *t);

/* The object t waits on (obj) is going away without waking it (collected: t's coroutine
 * was closed under it, a misuse): t no longer points to it (its unwait is not called). */
void mw_sched_forget(mw_task *t, void *obj);

/* Why the task was woken; resets to MW_WAKE_NONE. */
int mw_sched_reason(mw_task *t);
/* Makes a waiting task ready; `reason` is MW_WAKE_*. No-op for a task not waiting. */
void mw_sched_wake(mw_task *t, int reason);
/* Moves the deadline of a task waiting in mw_sched_wait (its timer fires MW_WAKE_TIMEOUT
 * then, as if the wait had been given it); the enclosing mw.timeout still applies. No-op
 * for a task not waiting. */
void mw_sched_set_deadline(mw_task *t, int64_t deadline);
/* Pushes nil, message, code for a non-READY wake reason and returns 3. */
int mw_sched_pushwake(lua_State *L, int reason);

/* Converts a timeout argument (nil/negative = none, else seconds) at idx to a deadline;
 * `dflt` (seconds, <0 none) applies when the argument is nil/none. */
int64_t mw_sched_deadline(lua_State *L, mw_rt *rt, int idx, double dflt);

/* The deadline `s` seconds from now (s < 0: none), "now" read from the clock, not the
 * loop's cached time: a timeout never ends early by the CPU time spent in the turn. */
int64_t mw_sched_after(mw_rt *rt, double s);

/* The standard failure triple: nil, msg, code; returns 3. */
int mw_pushfail(lua_State *L, const char *msg, const char *code);
/* nil, strerror(err), errno name; returns 3. */
int mw_pusherrno(lua_State *L, int err);
const char *mw_errname(int err);

#endif
