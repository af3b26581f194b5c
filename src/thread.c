/* thread: more event loops on more OS threads, each with a lua_State of its own (for the
 * load generator's -t N). A thread object creates its state in the caller's thread, so
 * values can be copied in before it starts (set) and out after it ended (get); while it
 * runs, nothing but the thread touches that state. Completion is signalled through an
 * eventfd, so join() parks only the calling task. */
#define _GNU_SOURCE
#include "thread.h"
#include "sched.h"
#include "list.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <lualib.h>

#define THREAD_MT "moonwire.Thread"

typedef struct mw_thread {
    mw_io io;                  /* the eventfd, in the owner's loop while someone joins */
    mw_rt *rt;
    lua_State *TL;
    pthread_t th;
    int started, done, joined, orphaned;
    pthread_mutex_t mu;
    char *code, *arg;
    size_t codelen, arglen;
    char *result;              /* the thread's return value (a string) or its error */
    size_t reslen;
    int failed;
    mw_task *joiners;          /* tasks waiting in join() (linked by wprev/wnext) */
} mw_thread;

#define COPY_MAXDEPTH 32
static const char copy_badtype[] = "only nil, booleans, numbers, strings and tables of those";

/* Copies the value at idx of `from` onto `to` (nil, booleans, numbers, strings and tables
 * of those, nested at most COPY_MAXDEPTH levels); returns NULL, or why it could not (then
 * `to` may hold a partial copy above its old top, and `from` is as it was). */
static const char *copy_value(lua_State *from, int idx, lua_State *to, int depth)
{
    idx = lua_absindex(from, idx);
    /* a table level holds the table, a key and a value on `to`, and lua_next's key and
     * value on `from`: both stacks must have room (a C function is given only
     * LUA_MINSTACK slots) */
    if (!lua_checkstack(to, 3) || !lua_checkstack(from, 2)) return "stack overflow";
    switch (lua_type(from, idx)) {
    case LUA_TNIL: lua_pushnil(to); return NULL;
    case LUA_TBOOLEAN: lua_pushboolean(to, lua_toboolean(from, idx)); return NULL;
    case LUA_TNUMBER:
        if (lua_isinteger(from, idx)) lua_pushinteger(to, lua_tointeger(from, idx));
        else lua_pushnumber(to, lua_tonumber(from, idx));
        return NULL;
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(from, idx, &n);
        lua_pushlstring(to, s, n);
        return NULL;
    }
    case LUA_TTABLE:
        if (depth > COPY_MAXDEPTH) return "tables nested deeper than 32 levels";
        lua_newtable(to);
        lua_pushnil(from);
        while (lua_next(from, idx)) {
            const char *err = copy_value(from, -2, to, depth + 1);
            if (!err) err = copy_value(from, -1, to, depth + 1);
            if (err) {
                lua_pop(from, 2);
                return err;
            }
            lua_rawset(to, -3);
            lua_pop(from, 1);
        }
        return NULL;
    default:
        return copy_badtype;
    }
}

static void *thread_main(void *arg)
{
    mw_thread *t = arg;
    lua_State *L = t->TL;
    int ok = luaL_loadbuffer(L, t->code, t->codelen, "=thread") == LUA_OK;
    if (ok) {
        lua_pushlstring(L, t->arg, t->arglen);
        ok = lua_pcall(L, 1, 1, 0) == LUA_OK;
    }
    size_t n = 0;
    const char *s = lua_tolstring(L, -1, &n);
    if (!s) { s = ok ? "" : "error object is not a string"; n = strlen(s); }
    char *copy = malloc(n + 1);
    if (copy) { memcpy(copy, s, n); copy[n] = '\0'; }
    lua_pop(L, 1);
    pthread_mutex_lock(&t->mu);
    t->result = copy;
    t->reslen = copy ? n : 0;
    t->failed = !ok;
    t->done = 1;
    int orphaned = t->orphaned;
    if (!orphaned) {
        uint64_t one = 1;
        ssize_t w = write(t->io.fd, &one, sizeof one);
        (void)w;
    }
    pthread_mutex_unlock(&t->mu);
    if (orphaned) {  /* nobody holds the handle any more: clean up here */
        lua_close(L);
        free(t->result);
        free(t->code);
        free(t->arg);
        pthread_mutex_destroy(&t->mu);
        close(t->io.fd);
        free(t);
    }
    return NULL;
}

typedef struct { mw_thread *t; } thread_box;

static mw_thread *checkthread(lua_State *L)
{
    thread_box *b = luaL_checkudata(L, 1, THREAD_MT);
    if (!b->t) luaL_error(L, "attempt to use a released thread");
    return b->t;
}

static void on_thread_event(mw_io *io, uint32_t ev)
{
    mw_thread *t = (mw_thread *)io;
    uint64_t n;
    (void)ev;
    while (read(io->fd, &n, sizeof n) > 0) {}
    /* every joiner, not just one: each one's unwait takes it off the list */
    mw_task *j;
    while ((j = t->joiners) != NULL) {
        if (j->state == MW_T_WAITING) {
            mw_sched_wake(j, MW_WAKE_READY);
        } else {
            MW_LIST_UNLINK(t->joiners, j, wprev, wnext);
            j->unwait = NULL;
            j->wait_obj = NULL;
        }
    }
}

/* thread_new() -> thread: a fresh lua_State with the standard libraries and this state's
 * package.path/cpath */
static int l_thread_new(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    thread_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->t = NULL;
    luaL_setmetatable(L, THREAD_MT);
    mw_thread *t = calloc(1, sizeof *t);
    if (!t) return luaL_error(L, "not enough memory");
    t->io.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (t->io.fd < 0) { free(t); return mw_pusherrno(L, errno); }
    t->io.on_event = on_thread_event;
    t->rt = rt;
    t->TL = luaL_newstate();
    if (!t->TL) { close(t->io.fd); free(t); return luaL_error(L, "not enough memory"); }
    pthread_mutex_init(&t->mu, NULL);
    b->t = t;
    luaL_openlibs(t->TL);
    lua_getglobal(L, "package");
    lua_getglobal(t->TL, "package");
    lua_getfield(L, -1, "path");
    lua_pushstring(t->TL, lua_tostring(L, -1));
    lua_setfield(t->TL, -2, "path");
    lua_getfield(L, -2, "cpath");
    lua_pushstring(t->TL, lua_tostring(L, -1));
    lua_setfield(t->TL, -2, "cpath");
    lua_pop(L, 3);
    lua_pop(t->TL, 1);
    if (mw_loop_add(&rt->loop, &t->io) < 0) return mw_pusherrno(L, errno);
    return 1;
}

/* t:set(name, value): a global of the thread's state (before start) */
static int t_set(lua_State *L)
{
    mw_thread *t = checkthread(L);
    const char *name = luaL_checkstring(L, 2);
    luaL_checkany(L, 3);
    if (t->started && !t->done) return luaL_error(L, "the thread is running");
    const char *err = copy_value(L, 3, t->TL, 0);
    if (err) {
        lua_settop(t->TL, 0);
        return luaL_argerror(L, 3, err);
    }
    lua_setglobal(t->TL, name);
    return 0;
}

/* t:get(name) -> a copy of the thread's global (before start or after it ended); nil for a
 * value of another type; raises for tables nested too deep to copy */
static int t_get(lua_State *L)
{
    mw_thread *t = checkthread(L);
    const char *name = luaL_checkstring(L, 2);
    pthread_mutex_lock(&t->mu);
    int running = t->started && !t->done;
    pthread_mutex_unlock(&t->mu);
    if (running) return luaL_error(L, "the thread is running");
    lua_getglobal(t->TL, name);
    int top = lua_gettop(L);
    const char *err = copy_value(t->TL, -1, L, 0);
    lua_pop(t->TL, 1);
    if (err) {
        lua_settop(L, top);
        if (err != copy_badtype) return luaL_error(L, "thread global '%s': %s", name, err);
        lua_pushnil(L);
    }
    return 1;
}

/* t:start(code, arg): runs load(code)(arg) on a new OS thread */
static int t_start(lua_State *L)
{
    mw_thread *t = checkthread(L);
    size_t cn, an;
    const char *code = luaL_checklstring(L, 2, &cn);
    const char *arg = luaL_optlstring(L, 3, "", &an);
    if (t->started) return luaL_error(L, "the thread was already started");
    /* the thread's copies; a start that fails frees them (nothing started: it may be
     * tried again, and each try would leave its copies behind) */
    free(t->code);
    free(t->arg);
    t->code = malloc(cn ? cn : 1);
    t->arg = malloc(an + 1);
    if (!t->code || !t->arg) return luaL_error(L, "not enough memory");  /* __gc frees */
    memcpy(t->code, code, cn);
    memcpy(t->arg, arg, an);
    t->codelen = cn;
    t->arglen = an;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);  /* signals stay with the main loop */
    int e = pthread_create(&t->th, NULL, thread_main, t);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) {
        free(t->code);
        free(t->arg);
        t->code = t->arg = NULL;
        return mw_pusherrno(L, e);
    }
    t->started = 1;
    lua_pushboolean(L, 1);
    return 1;
}

static int join_result(lua_State *L, mw_thread *t)
{
    if (!t->joined) {
        pthread_join(t->th, NULL);
        t->joined = 1;
    }
    if (t->failed) {
        lua_pushnil(L);
        lua_pushlstring(L, t->result ? t->result : "thread failed", t->result ? t->reslen : 13);
        lua_pushliteral(L, "thread");
        return 3;
    }
    lua_pushlstring(L, t->result ? t->result : "", t->result ? t->reslen : 0);
    return 1;
}

static void unwait_thread(mw_task *task)
{
    mw_thread *t = task->wait_obj;
    MW_LIST_UNLINK(t->joiners, task, wprev, wnext);
}

/* Waits, with the other joiners, for the thread's eventfd; ctx is the deadline. */
static int join_wait(lua_State *L, mw_thread *t, mw_task *task, int64_t deadline);

static int join_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_thread *t = checkthread(L);
    int why = mw_sched_reason(t->rt->current);
    (void)status;
    if (why != MW_WAKE_READY) return mw_sched_pushwake(L, why);
    pthread_mutex_lock(&t->mu);
    int done = t->done;
    pthread_mutex_unlock(&t->mu);
    if (done) return join_result(L, t);
    /* woken before the end (the eventfd's first writable edge): wait again, until the
     * same deadline */
    return join_wait(L, t, t->rt->current, (int64_t)ctx);
}

static int join_wait(lua_State *L, mw_thread *t, mw_task *task, int64_t deadline)
{
    MW_LIST_PUSH(t->joiners, task, wprev, wnext);
    task->wait_obj = t;
    task->unwait = unwait_thread;
    return mw_sched_wait(L, task, deadline, join_k, (lua_KContext)deadline);
}

/* t:join([timeout]) -> the string the thread's code returned | nil, err, "thread" */
static int t_join(lua_State *L)
{
    mw_thread *t = checkthread(L);
    if (!t->started) return luaL_error(L, "the thread was not started");
    int64_t d = mw_sched_deadline(L, t->rt, 2, -1);
    pthread_mutex_lock(&t->mu);
    int done = t->done;
    pthread_mutex_unlock(&t->mu);
    if (done) return join_result(L, t);
    mw_task *task = mw_sched_self(L, t->rt);
    lua_settop(L, 1);
    return join_wait(L, t, task, d);
}

static int t_gc(lua_State *L)
{
    thread_box *b = luaL_checkudata(L, 1, THREAD_MT);
    mw_thread *t = b->t;
    if (!t) return 0;
    b->t = NULL;
    mw_loop_del(&t->rt->loop, &t->io);
    /* a joiner keeps the handle on its stack, so one is left only when its coroutine was
     * closed under it (misuse): it must not point here any more */
    while (t->joiners) {
        mw_task *j = t->joiners;
        MW_LIST_UNLINK(t->joiners, j, wprev, wnext);
        mw_sched_forget(j, t);
    }
    pthread_mutex_lock(&t->mu);
    int running = t->started && !t->done;
    if (running) t->orphaned = 1;  /* the thread frees everything when it ends */
    pthread_mutex_unlock(&t->mu);
    if (running) {
        pthread_detach(t->th);
        return 0;
    }
    if (t->started && !t->joined) pthread_join(t->th, NULL);
    lua_close(t->TL);
    free(t->result);
    free(t->code);
    free(t->arg);
    pthread_mutex_destroy(&t->mu);
    close(t->io.fd);
    free(t);
    return 0;
}

static void mw_counters_open(lua_State *L);

void mw_thread_open(lua_State *L, int rtidx)
{
    static const luaL_Reg m[] = {
        { "set", t_set }, { "get", t_get }, { "start", t_start }, { "join", t_join }, { NULL, NULL }
    };
    if (luaL_newmetatable(L, THREAD_MT)) {
        luaL_newlib(L, m);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, t_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_pushvalue(L, rtidx);
    lua_pushcclosure(L, l_thread_new, 1);
    lua_setfield(L, -2, "thread");
    mw_counters_open(L);
}

/* ---- shared counters: a block of 64-bit cells that bench threads update and the main
 * thread reads while they run (the live progress line). The block counts its views (the
 * creator's and every thread's): the last one to go frees it, so a thread that still runs
 * when the creator gives up on the run (another thread failed) never writes freed memory. ---- */

#define COUNTERS_MT "moonwire.Counters"

typedef struct { int refs; uint64_t cells[]; } counters_block;
typedef struct { counters_block *b; int n; } counters_t;

static int c_new(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n > 0 && n <= 4096, 1, "1..4096 cells");
    counters_t *c = lua_newuserdatauv(L, sizeof *c, 0);
    c->b = NULL;
    c->n = (int)n;
    luaL_setmetatable(L, COUNTERS_MT);
    c->b = calloc(1, sizeof *c->b + (size_t)n * sizeof c->b->cells[0]);
    if (!c->b) return luaL_error(L, "not enough memory");
    c->b->refs = 1;
    return 1;
}

/* counters_attach(address, n): a view of another thread's block (it lives while viewed) */
static int c_attach(lua_State *L)
{
    lua_Integer addr = luaL_checkinteger(L, 1);
    lua_Integer n = luaL_checkinteger(L, 2);
    counters_t *c = lua_newuserdatauv(L, sizeof *c, 0);
    c->b = (counters_block *)(uintptr_t)addr;
    c->n = (int)n;
    __atomic_add_fetch(&c->b->refs, 1, __ATOMIC_RELAXED);
    luaL_setmetatable(L, COUNTERS_MT);
    return 1;
}

static uint64_t *cell(lua_State *L)
{
    counters_t *c = luaL_checkudata(L, 1, COUNTERS_MT);
    lua_Integer i = luaL_checkinteger(L, 2);
    luaL_argcheck(L, i >= 1 && i <= c->n && c->b, 2, "cell out of range");
    return &c->b->cells[i - 1];
}

static int c_set(lua_State *L)
{
    uint64_t *p = cell(L);
    __atomic_store_n(p, (uint64_t)luaL_checkinteger(L, 3), __ATOMIC_RELAXED);
    return 0;
}

static int c_get(lua_State *L)
{
    uint64_t *p = cell(L);
    lua_pushinteger(L, (lua_Integer)__atomic_load_n(p, __ATOMIC_RELAXED));
    return 1;
}

static int c_address(lua_State *L)
{
    counters_t *c = luaL_checkudata(L, 1, COUNTERS_MT);
    lua_pushinteger(L, (lua_Integer)(uintptr_t)c->b);
    return 1;
}

static int c_gc(lua_State *L)
{
    counters_t *c = luaL_checkudata(L, 1, COUNTERS_MT);
    if (c->b && __atomic_sub_fetch(&c->b->refs, 1, __ATOMIC_ACQ_REL) == 0) free(c->b);
    c->b = NULL;
    return 0;
}

static void mw_counters_open(lua_State *L)
{
    static const luaL_Reg m[] = { { "set", c_set }, { "get", c_get }, { "address", c_address }, { NULL, NULL } };
    if (luaL_newmetatable(L, COUNTERS_MT)) {
        luaL_newlib(L, m);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, c_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, c_new);
    lua_setfield(L, -2, "counters");
    lua_pushcfunction(L, c_attach);
    lua_setfield(L, -2, "counters_attach");
}
