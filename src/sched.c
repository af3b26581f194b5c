/* sched: tasks, the run queue, waits and wakes, run()/stop(), signals, error reporting.
 * The only file that calls lua_resume. Everything a waiting task holds is owned either by
 * a userdata on its stack or by the object it waits on, never by the continuation. */
#define _GNU_SOURCE
#include "sched.h"
#include "list.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <sys/epoll.h>
#include <unistd.h>

#define TASK_MT "moonwire.Task"
#define RT_MT "moonwire.Runtime"

static const char rt_key = 'r';
static const char park_marker = 'p';

/* ---- errors ---------------------------------------------------------------------- */

int mw_pushfail(lua_State *L, const char *msg, const char *code)
{
    lua_pushnil(L);
    lua_pushstring(L, msg);
    lua_pushstring(L, code);
    return 3;
}

const char *mw_errname(int err)
{
    switch (err) {
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case ECONNABORTED: return "ECONNABORTED";
    case EPIPE: return "EPIPE";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EADDRINUSE: return "EADDRINUSE";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENOENT: return "ENOENT";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case ENOMEM: return "ENOMEM";
    case ENOBUFS: return "ENOBUFS";
    case EINVAL: return "EINVAL";
    case ENOTCONN: return "ENOTCONN";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOTSOCK: return "ENOTSOCK";
    case EISCONN: return "EISCONN";
    default: return "EIO";
    }
}

int mw_pusherrno(lua_State *L, int err)
{
    return mw_pushfail(L, strerror(err), mw_errname(err));
}

/* ---- run queue and live list ----------------------------------------------------- */

static void enqueue(mw_rt *rt, mw_task *t)
{
    t->qnext = NULL;
    if (rt->runq_tail) rt->runq_tail->qnext = t;
    else rt->runq_head = t;
    rt->runq_tail = t;
}

static mw_task *dequeue(mw_rt *rt)
{
    mw_task *t = rt->runq_head;
    if (t) {
        rt->runq_head = t->qnext;
        if (!rt->runq_head) rt->runq_tail = NULL;
        t->qnext = NULL;
    }
    return t;
}

static void live_add(mw_rt *rt, mw_task *t)
{
    t->prev = NULL;
    t->next = rt->live;
    if (rt->live) rt->live->prev = t;
    rt->live = t;
    rt->nlive++;
}

static void live_remove(mw_rt *rt, mw_task *t)
{
    if (t->prev) t->prev->next = t->next;
    else rt->live = t->next;
    if (t->next) t->next->prev = t->prev;
    t->prev = t->next = NULL;
    rt->nlive--;
}

/* ---- waits ----------------------------------------------------------------------- */

static void detach(mw_task *t)
{
    if (t->unwait) t->unwait(t);
    t->unwait = NULL;
    t->wait_obj = NULL;
}

void mw_sched_wake(mw_task *t, int reason)
{
    if (t->state != MW_T_WAITING) return;
    detach(t);
    mw_timer_stop(&t->rt->loop, &t->timer);
    t->wake = reason;
    t->state = MW_T_READY;
    enqueue(t->rt, t);
}

/* The deadline a wait given `deadline` ends at: the nearer of it and the mw.timeout scope's. */
static int64_t effective_deadline(mw_task *t, int64_t deadline)
{
    return deadline < t->scope_deadline ? deadline : t->scope_deadline;
}

void mw_sched_set_deadline(mw_task *t, int64_t deadline)
{
    if (t->state != MW_T_WAITING) return;
    int64_t d = effective_deadline(t, deadline);
    if (d == MW_NO_DEADLINE) mw_timer_stop(&t->rt->loop, &t->timer);
    else (void)mw_timer_start(&t->rt->loop, &t->timer, d);   /* (an armed timer: no allocation) */
}

static void on_task_timer(mw_timer *tm)
{
    mw_task *t = (mw_task *)((char *)tm - offsetof(mw_task, timer));
    mw_sched_wake(t, MW_WAKE_TIMEOUT);
}

void mw_sched_forget(mw_task *t, void *obj)
{
    if (t->wait_obj != obj) return;
    t->unwait = NULL;
    t->wait_obj = NULL;
}

/* Every wait and requeue yields through here: the scheduler resumes a task with
 * rt->current set to it, so anything else (coroutine.resume on the task's coroutine) is
 * refused before the continuation reads a wake reason that is not its own. */
static int resumed_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_task *t = (mw_task *)ctx;
    if (t->rt->current != t)
        return luaL_error(L, "a waiting task was resumed outside the scheduler (coroutine.resume on a task's coroutine)");
    return t->k(L, status, t->kctx);
}

static int yield_to_sched(lua_State *L, mw_task *t, lua_KFunction k, lua_KContext ctx)
{
    t->k = k;
    t->kctx = ctx;
    return lua_yieldk(L, 0, (lua_KContext)t, resumed_k);
}

mw_task *mw_sched_self(lua_State *L, mw_rt *rt)
{
    mw_task *t = rt->current;
    if (!t) luaL_error(L, "blocking call outside a task");
    if (t->co != L) luaL_error(L, "blocking call inside a nested coroutine");
    return t;
}

int mw_sched_wait(lua_State *L, mw_task *t, int64_t deadline, lua_KFunction k, lua_KContext ctx)
{
    if (t->cancel_pending) {
        t->cancel_pending = 0;
        detach(t);
        t->wake = MW_WAKE_CANCEL;
        return k(L, LUA_YIELD, ctx);
    }
    t->streak = 0;
    int64_t d = effective_deadline(t, deadline);
    if (d != MW_NO_DEADLINE && mw_timer_start(&t->rt->loop, &t->timer, d) < 0) {
        detach(t);
        return luaL_error(L, "not enough memory");
    }
    t->state = MW_T_WAITING;
    return yield_to_sched(L, t, k, ctx);
}

int mw_sched_expired(mw_task *t, int64_t deadline)
{
    int64_t d = effective_deadline(t, deadline);
    /* the real clock (a timer fires once the loop's clock reaches its time) */
    return d != MW_NO_DEADLINE && mw_loop_clock() >= d;
}

int mw_sched_reason(mw_task *t)
{
    int r = t->wake;
    t->wake = MW_WAKE_NONE;
    return r;
}

int mw_sched_pushwake(lua_State *L, int reason)
{
    switch (reason) {
    case MW_WAKE_TIMEOUT: return mw_pushfail(L, "timeout", "timeout");
    case MW_WAKE_CANCEL: return mw_pushfail(L, "cancelled", "cancelled");
    default: return mw_pushfail(L, "closed", "closed");
    }
}

int64_t mw_sched_after(mw_rt *rt, double s)
{
    (void)rt;
    if (s < 0 || s != s || s > 1e9) return MW_NO_DEADLINE;
    /* from the real clock, not the cached one (set after the last poll): a task that
     * computed for a while in this turn would otherwise get a timeout that ends early by
     * that time (a vDSO read) */
    return mw_loop_clock() + (int64_t)(s * 1e9);
}

int64_t mw_sched_deadline(lua_State *L, mw_rt *rt, int idx, double dflt)
{
    double s = dflt;
    if (!lua_isnoneornil(L, idx)) {
        s = luaL_checknumber(L, idx);
        luaL_argcheck(L, s == s, idx, "not a number");   /* NaN is no "no timeout" */
    }
    return mw_sched_after(rt, s);
}

/* ---- tasks ----------------------------------------------------------------------- */

static mw_task *checktask(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, TASK_MT);
}

/* Creates a task running the function at fidx with the nargs values after it; pushes it. */
/* The loop.h rule, checked: Lua work made while the loop dispatches a batch could collect
 * a handle that a later event of the same batch points to. A violation is a bug in the
 * core, so it stops the process with a message instead of corrupting memory. */
static void check_not_in_batch(mw_rt *rt, const char *what)
{
    if (!rt->in_batch) return;
    fprintf(stderr, "moonwire: %s inside an event batch (an event callback ran Lua work)\n", what);
    abort();
}

static mw_task *spawn(lua_State *L, mw_rt *rt, int fidx, int nargs)
{
    check_not_in_batch(rt, "spawn");
    mw_task *t = lua_newuserdatauv(L, sizeof *t, 2);
    memset(t, 0, sizeof *t);
    t->rt = rt;
    t->ref = LUA_NOREF;
    t->state = MW_T_DONE;  /* "closed" until fully made */
    t->scope_deadline = MW_NO_DEADLINE;
    mw_timer_init(&t->timer, on_task_timer);
    luaL_setmetatable(L, TASK_MT);
    t->co = lua_newthread(L);
    lua_setiuservalue(L, -2, 1);
    lua_checkstack(t->co, nargs + 1);
    for (int i = 0; i <= nargs; i++) lua_pushvalue(L, fidx + i);
    lua_xmove(L, t->co, nargs + 1);
    t->nargs = nargs;
    lua_pushvalue(L, -1);
    t->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    t->state = MW_T_READY;
    live_add(rt, t);
    enqueue(rt, t);
    return t;
}

static void push_runtime(lua_State *L)
{
    lua_rawgetp(L, LUA_REGISTRYINDEX, &rt_key);
}

/* ---- workers ------------------------------------------------------------------------ */

/* Idle workers kept at most (an HTTP/2 server dispatches a stream's handler to one: 10
 * connections x 100 streams keep ~1000 busy at once); a burst beyond this ends the extra
 * workers when it is over. Past MW_IDLE_KEEP, an idle worker ends after MW_IDLE_LINGER
 * seconds without a job, so a burst's workers do not stay for good. */
#define MW_IDLE_MAX 1024
#define MW_IDLE_KEEP 128
#define MW_IDLE_LINGER 10.0

static void unwait_idle(mw_task *t)
{
    mw_rt *rt = t->rt;
    MW_LIST_UNLINK(rt->idle, t, wprev, wnext);
    rt->nidle--;
}

/* ctx 0: fn(...) returned (or this is the start: the stack holds fn and its arguments);
 * ctx 1: woken while idle: fn and its arguments are on the stack. */
static int worker_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_rt *rt = mw_rt_up(L);
    mw_task *t = rt->current;
    (void)status;
    if (ctx == 1 && mw_sched_reason(t) != MW_WAKE_READY) return 0;   /* cancelled */
    int n = lua_gettop(L);
    if (n >= 1) {
        lua_callk(L, n - 1, 0, 0, worker_k);    /* fn(...); a yield inside comes back here */
        lua_settop(L, 0);
    }
    if (rt->nidle >= MW_IDLE_MAX || rt->stopping) return 0;
    MW_LIST_PUSH(rt->idle, t, wprev, wnext);
    rt->nidle++;
    t->wait_obj = rt;
    t->unwait = unwait_idle;
    int64_t d = rt->nidle > MW_IDLE_KEEP ? mw_sched_after(rt, MW_IDLE_LINGER) : MW_NO_DEADLINE;
    return mw_sched_wait(L, t, d, worker_k, 1);
}

static int worker_main(lua_State *L)
{
    return worker_k(L, LUA_OK, 0);
}

mw_task *mw_sched_dispatch_n(mw_rt *rt, lua_State *L, int nargs)
{
    check_not_in_batch(rt, "mw_sched_dispatch");
    mw_task *w = rt->idle;
    if (w) {
        if (!lua_checkstack(w->co, nargs + 2)) luaL_error(L, "stack overflow");
        lua_xmove(L, w->co, nargs + 1);
        mw_sched_wake(w, MW_WAKE_READY);     /* its unwait takes it off the idle stack */
        w->nargs = nargs + 1;
        return w;
    }
    int fidx = lua_gettop(L) - nargs;        /* fn, then its arguments */
    lua_rawgeti(L, LUA_REGISTRYINDEX, rt->worker_ref);
    lua_insert(L, fidx);
    w = spawn(L, rt, fidx, nargs + 1);
    lua_settop(L, fidx - 1);                 /* the task, the body, fn, its arguments */
    return w;
}

void mw_sched_dispatch(mw_rt *rt, lua_State *L)
{
    mw_sched_dispatch_n(rt, L, 1);
}

/* dispatch(fn, ...) -> task: fn(...) in an idle worker (a new one when none is idle); the
 * worker waits for the next job when fn returns. For work started often (a request stream
 * each): no coroutine is made per call. */
static int l_dispatch(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    mw_task *w = mw_sched_dispatch_n(rt, L, lua_gettop(L) - 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->ref);
    return 1;
}

static int tostring_protected(lua_State *L)
{
    luaL_tolstring(L, 1, NULL);
    return 1;
}

/* Pushes the message for the error object at idx. The loop is not a protected call: an
 * object whose __tostring raises or returns no string must not unwind through it. */
static const char *error_message(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    lua_pushcfunction(L, tostring_protected);
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        lua_pop(L, 1);
        lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
    }
    return lua_tostring(L, -1);
}

static void report_error(mw_rt *rt, mw_task *t)
{
    lua_State *L = rt->L;
    lua_checkstack(L, 8);
    push_runtime(L);
    lua_getiuservalue(L, -1, 2);                 /* on_error handler */
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref);   /* the task */
    lua_getiuservalue(L, -1, 2);                 /* its error */
    if (lua_isfunction(L, -3)) {
        lua_pushvalue(L, -3);
        lua_pushvalue(L, -2);
        lua_pushvalue(L, -4);
        if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
            fprintf(stderr, "moonwire: error in on_error handler: %s\n", error_message(L, -1));
            lua_pop(L, 2);
        }
    } else {
        fprintf(stderr, "moonwire: uncaught error in task: %s\n", error_message(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 4);
}

static void unlink_joiner(mw_task *self);

static void finish(mw_rt *rt, mw_task *t)
{
    live_remove(rt, t);
    int had_joiners = t->joiners != NULL;
    mw_task *j;
    while ((j = t->joiners) != NULL) {
        if (j->state == MW_T_WAITING) {
            mw_sched_wake(j, MW_WAKE_READY);  /* its unwait unlinks it */
        } else {
            j->wait_obj = t;
            unlink_joiner(j);
            j->unwait = NULL;
        }
    }
    if (t->state == MW_T_FAILED && t == rt->main) rt->stopping = 1;
    else if (t->state == MW_T_FAILED && !had_joiners && !t->killed) report_error(rt, t);
    luaL_unref(rt->L, LUA_REGISTRYINDEX, t->ref);
    t->ref = LUA_NOREF;
}

/* Stores the error on top of rt->L (with a traceback of co when it is a string) as the
 * task's outcome and pops it. */
static void set_error(mw_rt *rt, mw_task *t, int traceback)
{
    lua_State *L = rt->L;
    if (traceback && lua_type(L, -1) == LUA_TSTRING) {
        luaL_traceback(L, t->co, lua_tostring(L, -1), 0);
        lua_remove(L, -2);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref);
    lua_insert(L, -2);
    lua_setiuservalue(L, -2, 2);
    lua_pop(L, 1);
}

static void resume(mw_rt *rt, mw_task *t)
{
    lua_State *co = t->co;
    int nargs = t->nargs, nres = 0;
    t->nargs = 0;
    t->state = MW_T_RUNNING;
    rt->current = t;
    int st = lua_resume(co, rt->L, nargs, &nres);
    rt->current = NULL;
    if (st == LUA_YIELD) {
        if (t->state == MW_T_RUNNING) {      /* a bare coroutine.yield() in the task */
            lua_pop(co, nres);
            t->state = MW_T_READY;
            enqueue(rt, t);
        }
        return;
    }
    if (st == LUA_OK) {
        t->nres = nres;
        t->state = MW_T_DONE;
    } else {
        lua_checkstack(rt->L, 4);
        lua_xmove(co, rt->L, 1);
        set_error(rt, t, 1);
        lua_resetthread(co);                /* runs pending __close (sockets) */
        t->state = MW_T_FAILED;
    }
    finish(rt, t);
}

/* Ends every live task: detaches its waits, closes its thread (running its <close>
 * variables) and records `why` as its error. */
static void kill_all(mw_rt *rt, const char *why, mw_task *keep)
{
    mw_task *t;
    for (t = rt->live; t; t = t->next) {
        if (t == keep) continue;
        detach(t);
        mw_timer_stop(&rt->loop, &t->timer);
        t->state = MW_T_FAILED;
        t->killed = 1;
    }
    rt->runq_head = rt->runq_tail = NULL;
    for (;;) {
        t = rt->live;
        if (t && t == keep) t = t->next;
        if (!t) break;
        lua_pushstring(rt->L, why);
        set_error(rt, t, 0);
        lua_resetthread(t->co);
        finish(rt, t);
    }
    rt->runq_head = rt->runq_tail = NULL;
}

static void spawn_signal_handlers(mw_rt *rt);

static int run_loop(mw_rt *rt)
{
    for (;;) {
        /* run what is ready now; tasks made ready meanwhile wait for the next turn so
         * that I/O and timers are served between turns */
        mw_task *last = rt->runq_tail;
        while (last && !rt->stopping) {
            mw_task *t = dequeue(rt);
            resume(rt, t);
            if (t == last) break;
        }
        if (rt->sigpending) spawn_signal_handlers(rt);
        if (rt->before_poll) rt->before_poll(rt);
        if (rt->stopping || (rt->nlive == rt->nidle && rt->nwatch == 0)) return 0;
        rt->in_batch = 1;
        int rc = mw_loop_poll(&rt->loop, rt->runq_head == NULL);
        rt->in_batch = 0;
        if (rc < 0) return -1;
        if (rt->after_poll) rt->after_poll(rt);   /* before timers: I/O first, as it came */
        mw_loop_run_timers(&rt->loop);
    }
}

/* run_loop under a protected call (the light userdata of a run_args on the stack): an error
 * raised below it (out of memory) must still let l_run end the run's tasks and state, or
 * every later run() would find the loop "already running". */
typedef struct { mw_rt *rt; int rc, err; } run_args;

static int run_protected(lua_State *L)
{
    run_args *a = lua_touserdata(L, 1);
    a->rc = run_loop(a->rt);
    a->err = errno;
    return 0;
}

static int l_run(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (rt->running) return luaL_error(L, "the loop is already running");
    if (rt->loop.epfd < 0) return luaL_error(L, "the runtime is closed");
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
    int nargs = lua_gettop(L) - 1;
    rt->L = L;
    mw_loop_update(&rt->loop);
    mw_task *main = spawn(L, rt, 1, nargs);
    int mainidx = lua_gettop(L);
    rt->main = main;
    rt->running = 1;
    rt->stopping = 0;
    rt->runs++;
    run_args a = { rt, 0, 0 };
    lua_pushcfunction(L, run_protected);
    lua_pushlightuserdata(L, &a);
    int st = lua_pcall(L, 1, 0, 0);          /* on failure: the error on top */
    rt->current = NULL;
    rt->in_batch = 0;
    if (rt->after_run) rt->after_run(rt, L);
    if (rt->nlive > 0) kill_all(rt, "stopped", NULL);
    rt->running = 0;
    rt->stopping = 0;
    rt->main = NULL;
    if (st != LUA_OK) return lua_error(L);
    if (a.rc < 0) return luaL_error(L, "epoll_wait failed: %s", strerror(a.err));
    if (main->state == MW_T_FAILED) {
        if (main->killed) return 0;          /* mw.stop() before main returned */
        lua_getiuservalue(L, mainidx, 2);
        return lua_error(L);
    }
    int top = lua_gettop(main->co);
    if (!lua_checkstack(L, main->nres) || !lua_checkstack(main->co, main->nres))
        return luaL_error(L, "stack overflow");
    for (int i = top - main->nres + 1; i <= top; i++) lua_pushvalue(main->co, i);
    lua_xmove(main->co, L, main->nres);
    return main->nres;
}

static int l_spawn(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    spawn(L, rt, 1, lua_gettop(L) - 1);
    return 1;
}

/* A task body for a function whose frame should start low on the task's stack (a Lua stack
 * never shrinks back while its task waits, so a task that waits long, as a WebSocket
 * handler's does, should not grow it): body(a, f, b) calls f(a, b) protected, with the
 * message handler msgh, then after(a, ok, err). f's frame starts at slot 5 of the task's stack
 * (under xpcall called from a Lua function: slot 8). protected_body(after, msgh) -> body. */
static int body_done(lua_State *L, int status, lua_KContext ctx)
{
    (void)L; (void)status; (void)ctx;
    return 0;
}

static int body_k(lua_State *L, int status, lua_KContext ctx)
{
    int ok = status == LUA_OK || status == LUA_YIELD;
    (void)ctx;
    lua_settop(L, ok ? 2 : 3);                  /* a, msgh[, the error] */
    lua_pushvalue(L, lua_upvalueindex(1));      /* after */
    lua_pushvalue(L, 1);
    lua_pushboolean(L, ok);
    if (ok) lua_pushnil(L); else lua_pushvalue(L, 3);
    lua_callk(L, 3, 0, 0, body_done);
    return 0;
}

static int protected_body(lua_State *L)
{
    lua_settop(L, 3);                           /* a f b */
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_insert(L, 2);                           /* a msgh f b */
    lua_pushvalue(L, 1);
    lua_insert(L, 4);                           /* a msgh f a b */
    return body_k(L, lua_pcallk(L, 2, 0, 2, 0, body_k), 0);
}

static int l_protected_body(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    lua_pushcclosure(L, protected_body, 2);
    return 1;
}

static int l_stop(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    if (rt->running) rt->stopping = 1;
    return 0;
}

static int l_now(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    if (!rt->running) mw_loop_update(&rt->loop);
    lua_pushnumber(L, (double)rt->loop.now / 1e9);
    return 1;
}

/* hrtime() -> the monotonic clock now, in integer nanoseconds (not the cached loop clock) */
static int l_hrtime(lua_State *L)
{
    lua_pushinteger(L, mw_loop_clock());
    return 1;
}

static int l_current(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    if (rt->current && rt->current->co == L) lua_rawgeti(L, LUA_REGISTRYINDEX, rt->current->ref);
    else lua_pushnil(L);
    return 1;
}

static int sleep_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_rt *rt = mw_rt_up(L);
    mw_task *t = rt->current;
    int why = mw_sched_reason(t);
    (void)status;
    if (why == MW_WAKE_TIMEOUT && (int64_t)ctx <= t->scope_deadline) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return mw_sched_pushwake(L, why);
}

static int l_sleep(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    double s = luaL_checknumber(L, 1);
    luaL_argcheck(L, s == s, 1, "not a number");
    mw_task *t = mw_sched_self(L, rt);
    /* from the real clock, not the cached one: a sleep never ends early */
    int64_t now = mw_loop_clock();
    int64_t d = s <= 0 ? now : s > 1e9 ? MW_NO_DEADLINE : now + (int64_t)(s * 1e9);
    t->wait_obj = NULL;            /* a sleep waits on nothing: no record to undo */
    t->unwait = NULL;
    return mw_sched_wait(L, t, d, sleep_k, (lua_KContext)d);
}

static int yield_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)L; (void)status;
    return (int)ctx;
}

int mw_sched_requeue(lua_State *L, mw_task *t, lua_KFunction k, lua_KContext ctx)
{
    t->streak = 0;
    t->state = MW_T_READY;
    enqueue(t->rt, t);
    return yield_to_sched(L, t, k, ctx);
}

int mw_sched_checkpoint(lua_State *L, mw_task *t, int nres)
{
    if (++t->streak < MW_STREAK_MAX) return nres;
    return mw_sched_requeue(L, t, yield_k, nres);
}

static int l_yield(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    mw_task *t = mw_sched_self(L, rt);
    return mw_sched_requeue(L, t, yield_k, 0);
}

/* park/unpark: the primitive the Lua layer builds channels and the like on.
 * park([timeout]) waits until unpark(task, ...) and returns those values, or
 * nil, "timeout"|"cancelled", code. */
static int park_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_rt *rt = mw_rt_up(L);
    int why = mw_sched_reason(rt->current);
    (void)status;
    if (why != MW_WAKE_READY) return mw_sched_pushwake(L, why);
    return lua_gettop(L) - (int)ctx;
}

static int l_park(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    int64_t d = mw_sched_deadline(L, rt, 1, -1);
    mw_task *t = mw_sched_self(L, rt);
    t->wait_obj = (void *)&park_marker;
    t->unwait = NULL;              /* unpark finds it by the marker; nothing to undo */
    return mw_sched_wait(L, t, d, park_k, lua_gettop(L));
}

static int l_unpark(lua_State *L)
{
    mw_task *t = checktask(L, 1);
    int n = lua_gettop(L) - 1;
    if (t->state != MW_T_WAITING || t->wait_obj != &park_marker) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (!lua_checkstack(t->co, n + 1)) return luaL_error(L, "stack overflow");
    lua_xmove(L, t->co, n);
    mw_sched_wake(t, MW_WAKE_READY);
    t->nargs = n;
    lua_pushboolean(L, 1);
    return 1;
}

/* deadline_push(seconds) -> previous; deadline_pop(previous): mw.timeout's scope. */
static int l_deadline_push(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    double s = luaL_checknumber(L, 1);
    luaL_argcheck(L, s == s, 1, "not a number");
    mw_task *t = mw_sched_self(L, rt);
    int64_t prev = t->scope_deadline;
    int64_t d = mw_sched_after(rt, s);  /* negative: no deadline, as for every timeout */
    if (d < prev) t->scope_deadline = d;
    lua_pushinteger(L, prev);
    return 1;
}

static int l_deadline_pop(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    lua_Integer prev = luaL_checkinteger(L, 1);
    mw_task *t = mw_sched_self(L, rt);
    t->scope_deadline = prev;
    return 0;
}

/* task() -> the running task; raises as every blocking call does outside a task (or in a
 * coroutine nested in one): for blocking calls written in Lua (channels). */
static int l_task(lua_State *L)
{
    mw_task *t = mw_sched_self(L, mw_rt_up(L));
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref);
    return 1;
}

static int l_on_error(lua_State *L)
{
    if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_settop(L, 1);
    push_runtime(L);
    lua_insert(L, 1);
    lua_setiuservalue(L, 1, 2);
    return 0;
}

/* ---- task methods ------------------------------------------------------------------ */

static void unlink_joiner(mw_task *self)
{
    mw_task *t = self->wait_obj;
    MW_LIST_UNLINK(t->joiners, self, wprev, wnext);
}

static int push_outcome(lua_State *L, mw_task *t, int idx)
{
    if (t->state == MW_T_DONE) {
        int top = lua_gettop(t->co);
        if (!lua_checkstack(L, t->nres + 1) || !lua_checkstack(t->co, t->nres))
            return luaL_error(L, "stack overflow");
        lua_pushboolean(L, 1);
        for (int i = top - t->nres + 1; i <= top; i++) lua_pushvalue(t->co, i);
        lua_xmove(t->co, L, t->nres);
        return t->nres + 1;
    }
    lua_pushboolean(L, 0);
    lua_getiuservalue(L, idx, 2);
    return 2;
}

static int join_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_rt *rt = mw_rt_up(L);
    mw_task *t = checktask(L, 1);
    int why = mw_sched_reason(rt->current);
    (void)status; (void)ctx;
    if (why != MW_WAKE_READY) return mw_sched_pushwake(L, why);
    return push_outcome(L, t, 1);
}

/* Whether t waits, directly or through a chain of joins, for self: self joining t would
 * then wait forever (nothing else wakes a join). The chain holds no cycle (each join is
 * checked here), so the walk ends; nlive bounds it anyway. */
static int joins_into(mw_task *t, mw_task *self)
{
    for (int n = t->rt->nlive; n >= 0 && t->state == MW_T_WAITING && t->unwait == unlink_joiner; n--) {
        t = t->wait_obj;
        if (t == self) return 1;
    }
    return 0;
}

static int t_join(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    mw_task *t = checktask(L, 1);
    int64_t d = mw_sched_deadline(L, rt, 2, -1);
    if (t->state == MW_T_DONE || t->state == MW_T_FAILED) {
        t->joined = 1;
        return push_outcome(L, t, 1);
    }
    mw_task *self = mw_sched_self(L, rt);
    if (self == t) return luaL_error(L, "a task cannot join itself");
    if (joins_into(t, self)) return luaL_error(L, "join cycle: the task is waiting, through joins, for this one");
    t->joined = 1;
    MW_LIST_PUSH(t->joiners, self, wprev, wnext);
    self->wait_obj = t;
    self->unwait = unlink_joiner;
    return mw_sched_wait(L, self, d, join_k, 0);
}

int mw_sched_cancel(mw_task *t)
{
    int alive = t->state != MW_T_DONE && t->state != MW_T_FAILED;
    if (t->state == MW_T_WAITING) mw_sched_wake(t, MW_WAKE_CANCEL);
    else if (alive) t->cancel_pending = 1;
    return alive;
}

static int t_cancel(lua_State *L)
{
    lua_pushboolean(L, mw_sched_cancel(checktask(L, 1)));
    return 1;
}

static int t_status(lua_State *L)
{
    static const char *const names[] = { "ready", "running", "waiting", "done", "failed" };
    mw_task *t = checktask(L, 1);
    lua_pushstring(L, names[t->state]);
    return 1;
}

static int t_tostring(lua_State *L)
{
    mw_task *t = checktask(L, 1);
    static const char *const names[] = { "ready", "running", "waiting", "done", "failed" };
    lua_pushfstring(L, "moonwire.Task (%s): %p", names[t->state], (void *)t);
    return 1;
}

/* ---- signals ----------------------------------------------------------------------- */

static const struct { const char *name; int signo; } signames[] = {
    { "SIGINT", SIGINT }, { "SIGTERM", SIGTERM }, { "SIGHUP", SIGHUP },
    { "SIGUSR1", SIGUSR1 }, { "SIGUSR2", SIGUSR2 }, { "SIGQUIT", SIGQUIT },
    { "SIGWINCH", SIGWINCH }, { "SIGCHLD", SIGCHLD }, { NULL, 0 }
};

static void on_signalfd(mw_io *io, uint32_t events)
{
    mw_rt *rt = (mw_rt *)((char *)io - offsetof(mw_rt, sigio));
    struct signalfd_siginfo si[16];
    (void)events;
    for (;;) {
        ssize_t n = read(io->fd, si, sizeof si);
        if (n <= 0) break;
        for (size_t i = 0; i < (size_t)n / sizeof si[0]; i++)
            if (si[i].ssi_signo < 64) rt->sigpending |= (uint64_t)1 << si[i].ssi_signo;
    }
}

static void spawn_signal_handlers(mw_rt *rt)
{
    lua_State *L = rt->L;
    uint64_t pending = rt->sigpending;
    rt->sigpending = 0;
    push_runtime(L);
    lua_getiuservalue(L, -1, 1);
    for (int i = 0; signames[i].name; i++) {
        if (!(pending & ((uint64_t)1 << signames[i].signo))) continue;
        lua_rawgeti(L, -1, signames[i].signo);
        if (lua_isfunction(L, -1)) {
            lua_pushstring(L, signames[i].name);
            spawn(L, rt, lua_gettop(L) - 1, 1);
            lua_pop(L, 2);  /* the task and the name */
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 2);
}

static int l_signal(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    const char *name = luaL_checkstring(L, 1);
    int signo = 0;
    for (int i = 0; signames[i].name; i++)
        if (strcmp(signames[i].name, name) == 0) signo = signames[i].signo;
    if (!signo) return luaL_argerror(L, 1, lua_pushfstring(L, "unknown signal '%s'", name));
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    if (!rt->sigmask_saved) {
        pthread_sigmask(SIG_SETMASK, NULL, &rt->oldmask);
        rt->sigmask_saved = 1;
    }
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, signo);
    if (lua_isnil(L, 2)) {
        sigdelset(&rt->sigset, signo);
        if (!sigismember(&rt->oldmask, signo)) pthread_sigmask(SIG_UNBLOCK, &one, NULL);
    } else {
        sigaddset(&rt->sigset, signo);
        pthread_sigmask(SIG_BLOCK, &one, NULL);
    }
    int fd = signalfd(rt->sigio.fd, &rt->sigset, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0) return mw_pusherrno(L, errno);
    if (rt->sigio.fd < 0) {
        rt->sigio.fd = fd;
        if (mw_loop_add(&rt->loop, &rt->sigio) < 0) {
            int e = errno;
            close(fd);
            rt->sigio.fd = -1;
            return mw_pusherrno(L, e);
        }
    }
    push_runtime(L);
    lua_getiuservalue(L, -1, 1);
    lua_pushvalue(L, 2);
    lua_rawseti(L, -2, signo);
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- processes ------------------------------------------------------------------------ */

static int signo_of(lua_State *L, int idx);

/* fork([parent_death]) -> pid (0 in the child) | nil, err, code. The child gets a loop of its
 * own (the epoll instance is shared across fork, so it must never touch the parent's), keeps
 * its signal handlers, loses the resolver threads (threads do not survive fork) and every task
 * but the calling one: it goes on as that task alone. parent_death: a signal's name, sent to
 * the child when this process dies, however it dies (PR_SET_PDEATHSIG: the workers of a
 * supervisor killed with SIGKILL get SIGTERM and stop instead of living on orphaned). */
static int l_fork(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    int pdsig = lua_isnoneornil(L, 1) ? 0 : signo_of(L, 1);
    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return mw_pusherrno(L, errno);
    if (pid == 0) {
        /* (a parent gone before prctl: the signal is sent here, by the child itself) */
        if (pdsig && prctl(PR_SET_PDEATHSIG, pdsig) == 0 && getppid() != parent) kill(getpid(), pdsig);
        int fresh = epoll_create1(EPOLL_CLOEXEC);
        if (fresh < 0) _exit(127);
        close(rt->loop.epfd);
        rt->loop.epfd = fresh;
        if (rt->sigio.fd >= 0) {
            /* the signalfd's mask is shared with the parent's copy: take a new one */
            close(rt->sigio.fd);
            rt->sigio.fd = signalfd(-1, &rt->sigset, SFD_NONBLOCK | SFD_CLOEXEC);
            if (rt->sigio.fd >= 0) mw_loop_add(&rt->loop, &rt->sigio);
        }
        /* signals the parent read from its signalfd but has not handed to Lua yet are the
         * parent's (a SIGTERM meant for the supervisor must not stop its new worker) */
        rt->sigpending = 0;
        rt->resolver = NULL;  /* its threads and maybe its locked mutex stay behind: leaked */
        mw_task *keep = rt->current && rt->current->co == L ? rt->current : NULL;
        if (rt->running) {
            rt->main = keep;  /* the loop now lives for this task: the old main is gone */
            kill_all(rt, "forked", keep);
        }
    }
    lua_pushinteger(L, pid);
    return 1;
}

/* waitpid([pid = -1]) without blocking -> pid, "exit"|"signal", code | 0 (none ready) | nil, err, code */
static int l_waitpid(lua_State *L)
{
    pid_t pid = (pid_t)luaL_optinteger(L, 1, -1);
    int st;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r < 0) return mw_pusherrno(L, errno);
    lua_pushinteger(L, r);
    if (r == 0) return 1;
    if (WIFSIGNALED(st)) {
        lua_pushliteral(L, "signal");
        lua_pushinteger(L, WTERMSIG(st));
    } else {
        lua_pushliteral(L, "exit");
        lua_pushinteger(L, WEXITSTATUS(st));
    }
    return 3;
}

static int signo_of(lua_State *L, int idx)
{
    const char *name = luaL_checkstring(L, idx);
    for (int i = 0; signames[i].name; i++)
        if (strcmp(signames[i].name, name) == 0) return signames[i].signo;
    if (strcmp(name, "SIGKILL") == 0) return SIGKILL;
    return luaL_argerror(L, idx, lua_pushfstring(L, "unknown signal '%s'", name));
}

/* kill(pid, signame) -> true | nil, err, code */
static int l_kill(lua_State *L)
{
    pid_t pid = (pid_t)luaL_checkinteger(L, 1);
    int sig = signo_of(L, 2);
    if (kill(pid, sig) < 0) return mw_pusherrno(L, errno);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_getpid(lua_State *L)
{
    lua_pushinteger(L, getpid());
    return 1;
}

/* ---- the runtime ---------------------------------------------------------------------- */

static int rt_gc(lua_State *L)
{
    mw_rt *rt = luaL_checkudata(L, 1, RT_MT);
    if (rt->sigio.fd >= 0) {
        mw_loop_del(&rt->loop, &rt->sigio);
        close(rt->sigio.fd);
        rt->sigio.fd = -1;
    }
    if (rt->sigmask_saved) {
        pthread_sigmask(SIG_SETMASK, &rt->oldmask, NULL);
        rt->sigmask_saved = 0;
    }
    if (rt->resolver) rt->resolver_free(rt->resolver);
    rt->resolver = NULL;
    mw_loop_free(&rt->loop);
    mw_buf_pool_free(&rt->pool);
    return 0;
}

mw_rt *mw_sched_newruntime(lua_State *L)
{
    push_runtime(L);
    if (!lua_isnil(L, -1)) return lua_touserdata(L, -1);
    lua_pop(L, 1);
    mw_rt *rt = lua_newuserdatauv(L, sizeof *rt, 2);
    memset(rt, 0, sizeof *rt);
    rt->loop.epfd = -1;
    rt->sigio.fd = -1;
    rt->sigio.on_event = on_signalfd;
    sigemptyset(&rt->sigset);
    if (luaL_newmetatable(L, RT_MT)) {
        lua_pushcfunction(L, rt_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_newtable(L);
    lua_setiuservalue(L, -2, 1);
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, worker_main, 1);
    rt->worker_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (mw_loop_init(&rt->loop) < 0) luaL_error(L, "epoll_create1 failed: %s", strerror(errno));
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &rt_key);
    return rt;
}

void mw_sched_open(lua_State *L, int rtidx)
{
    static const luaL_Reg task_methods[] = {
        { "join", t_join }, { "cancel", t_cancel }, { "status", t_status }, { NULL, NULL }
    };
    static const luaL_Reg funcs[] = {
        { "run", l_run }, { "spawn", l_spawn }, { "dispatch", l_dispatch },
        { "protected_body", l_protected_body }, { "stop", l_stop }, { "now", l_now },
        { "current", l_current }, { "task", l_task }, { "sleep", l_sleep }, { "yield", l_yield },
        { "park", l_park }, { "unpark", l_unpark }, { "deadline_push", l_deadline_push },
        { "deadline_pop", l_deadline_pop }, { "on_error", l_on_error }, { "signal", l_signal },
        { "hrtime", l_hrtime }, { "fork", l_fork }, { "waitpid", l_waitpid }, { "kill", l_kill }, { "getpid", l_getpid },
        { NULL, NULL }
    };
    if (luaL_newmetatable(L, TASK_MT)) {
        lua_newtable(L);
        lua_pushvalue(L, rtidx);
        luaL_setfuncs(L, task_methods, 1);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, t_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, "moonwire.Task");
        lua_setfield(L, -2, "__name");
    }
    lua_pop(L, 1);
    lua_pushvalue(L, rtidx);
    luaL_setfuncs(L, funcs, 1);
}
