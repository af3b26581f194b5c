/* dns: getaddrinfo on up to MW_DNS_THREADS worker threads. Completed jobs come back to the
 * loop through an eventfd; the loop wakes the waiting task. Workers block every signal so
 * that signals reach the loop's signalfd, never a worker. */
#define _GNU_SOURCE
#include "dns.h"

#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define MW_DNS_THREADS 4
#define JOB_MT "moonwire.DnsJob"

struct mw_resolver {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    mw_dnsjob *queue, *queue_tail;
    mw_dnsjob *done;
    int nthreads, idle;
    int shutdown;
    int refs;                  /* the runtime, each thread, each job */
    mw_io io;                  /* the eventfd */
    mw_rt *rt;
};

/* Drops one reference; returns 1 if the caller must free r (after unlocking). */
static int unref_locked(struct mw_resolver *r)
{
    return --r->refs == 0;
}

static void resolver_destroy(struct mw_resolver *r)
{
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cond);
    free(r);
}

static int job_free_locked(mw_dnsjob *j)
{
    struct mw_resolver *r = j->r;
    if (j->res) freeaddrinfo(j->res);
    free(j->host);
    free(j);
    return unref_locked(r);
}

static void *worker(void *arg)
{
    struct mw_resolver *r = arg;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (!r->queue && !r->shutdown) {
            r->idle++;
            pthread_cond_wait(&r->cond, &r->mu);
            r->idle--;
        }
        if (!r->queue) break;  /* shutdown with nothing left */
        mw_dnsjob *j = r->queue;
        r->queue = j->next;
        if (!r->queue) r->queue_tail = NULL;
        pthread_mutex_unlock(&r->mu);

        struct addrinfo hints;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = j->family;
        hints.ai_socktype = j->socktype;
        hints.ai_flags = j->flags;
        j->err = getaddrinfo(j->host, j->service[0] ? j->service : NULL, &hints, &j->res);

        pthread_mutex_lock(&r->mu);
        j->complete = 1;
        if (j->orphaned || r->shutdown) {
            if (j->orphaned) job_free_locked(j);  /* r->refs stays > 0: we hold one */
        } else {
            j->in_done = 1;
            j->next = r->done;
            r->done = j;
            uint64_t one = 1;
            ssize_t n = write(r->io.fd, &one, sizeof one);
            (void)n;
        }
    }
    int last = unref_locked(r);
    pthread_mutex_unlock(&r->mu);
    if (last) resolver_destroy(r);
    return NULL;
}

static void on_eventfd(mw_io *io, uint32_t events)
{
    struct mw_resolver *r = (struct mw_resolver *)((char *)io - offsetof(struct mw_resolver, io));
    uint64_t n;
    (void)events;
    while (read(io->fd, &n, sizeof n) > 0) {}
    pthread_mutex_lock(&r->mu);
    mw_dnsjob *j = r->done;
    r->done = NULL;
    while (j) {
        mw_dnsjob *next = j->next;
        j->in_done = 0;
        j->next = NULL;
        if (j->orphaned) job_free_locked(j);  /* the runtime's ref keeps r alive */
        else if (j->waiter) mw_sched_wake(j->waiter, MW_WAKE_READY);
        j = next;
    }
    pthread_mutex_unlock(&r->mu);
}

static struct mw_resolver *resolver_get(mw_rt *rt)
{
    if (rt->resolver) return rt->resolver;
    struct mw_resolver *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->io.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->io.fd < 0) { free(r); return NULL; }
    r->io.on_event = on_eventfd;
    if (mw_loop_add(&rt->loop, &r->io) < 0) { close(r->io.fd); free(r); return NULL; }
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cond, NULL);
    r->refs = 1;
    r->rt = rt;
    rt->resolver = r;
    rt->resolver_free = mw_resolver_free;
    return r;
}

void mw_resolver_free(struct mw_resolver *r)
{
    mw_loop_del(&r->rt->loop, &r->io);
    pthread_mutex_lock(&r->mu);
    r->shutdown = 1;
    close(r->io.fd);
    r->io.fd = -1;
    /* jobs not started: those nobody holds go now; held ones go with their holder */
    mw_dnsjob *j = r->queue;
    r->queue = r->queue_tail = NULL;
    while (j) {
        mw_dnsjob *next = j->next;
        j->complete = 1;
        j->next = NULL;
        if (j->orphaned) job_free_locked(j);
        j = next;
    }
    j = r->done;
    r->done = NULL;
    while (j) {
        mw_dnsjob *next = j->next;
        j->in_done = 0;
        if (j->orphaned) job_free_locked(j);
        j = next;
    }
    pthread_cond_broadcast(&r->cond);
    int last = unref_locked(r);
    pthread_mutex_unlock(&r->mu);
    if (last) resolver_destroy(r);
}

static int submit(struct mw_resolver *r, mw_dnsjob *j)
{
    pthread_mutex_lock(&r->mu);
    if (r->idle == 0 && r->nthreads < MW_DNS_THREADS) {
        pthread_t th;
        pthread_attr_t attr;
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        r->refs++;
        if (pthread_create(&th, &attr, worker, r) == 0) r->nthreads++;
        else r->refs--;
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (r->nthreads == 0) {
        pthread_mutex_unlock(&r->mu);
        return -1;
    }
    j->r = r;
    r->refs++;
    j->next = NULL;
    if (r->queue_tail) r->queue_tail->next = j;
    else r->queue = j;
    r->queue_tail = j;
    pthread_cond_signal(&r->cond);
    pthread_mutex_unlock(&r->mu);
    return 0;
}

static int job_gc(lua_State *L)
{
    mw_dnsjob **pj = lua_touserdata(L, 1);
    mw_dnsjob *j = *pj;
    *pj = NULL;
    if (!j) return 0;
    if (!j->r) {                       /* never submitted */
        free(j->host);
        free(j);
        return 0;
    }
    struct mw_resolver *r = j->r;
    pthread_mutex_lock(&r->mu);
    if (j->waiter) mw_sched_forget(j->waiter, j);   /* its coroutine was closed under it */
    j->waiter = NULL;
    int last = 0;
    if (j->complete && !j->in_done) last = job_free_locked(j);
    else j->orphaned = 1;
    pthread_mutex_unlock(&r->mu);
    if (last) resolver_destroy(r);
    return 0;
}

mw_dnsjob *mw_dns_push(lua_State *L, mw_rt *rt, const char *host, int port, int family)
{
    mw_dnsjob **pj = lua_newuserdatauv(L, sizeof *pj, 0);
    *pj = NULL;
    if (luaL_newmetatable(L, JOB_MT)) {
        lua_pushcfunction(L, job_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    mw_dnsjob *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    j->host = strdup(host);
    if (!j->host) { free(j); return NULL; }
    if (port > 0) snprintf(j->service, sizeof j->service, "%d", port);
    j->family = family;
    j->socktype = SOCK_STREAM;
    j->flags = AI_ADDRCONFIG | (port > 0 ? AI_NUMERICSERV : 0);
    *pj = j;
    struct mw_resolver *r = resolver_get(rt);
    if (!r || submit(r, j) < 0) {
        j->complete = 1;
        j->err = EAI_SYSTEM;
    }
    return j;
}

static void unwait_job(mw_task *t)
{
    mw_dnsjob *j = t->wait_obj;
    j->waiter = NULL;
}

int mw_dns_wait(lua_State *L, mw_task *t, mw_dnsjob *j, int64_t deadline, lua_KFunction k,
                lua_KContext ctx)
{
    int done;
    if (j->r) {
        pthread_mutex_lock(&j->r->mu);
        done = j->complete && !j->in_done;
        pthread_mutex_unlock(&j->r->mu);
    } else {
        done = 1;
    }
    if (done) {
        t->wake = MW_WAKE_READY;
        return k(L, LUA_YIELD, ctx);
    }
    j->waiter = t;
    t->wait_obj = j;
    t->unwait = unwait_job;
    return mw_sched_wait(L, t, deadline, k, ctx);
}

/* mw.resolve(host [, port [, timeout]]) -> { {family=, host=, port=}, ... } */
static int resolve_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_rt *rt = mw_rt_up(L);
    mw_dnsjob *j = *(mw_dnsjob **)lua_touserdata(L, 4);
    int why = mw_sched_reason(rt->current);
    (void)status; (void)ctx;
    if (why != MW_WAKE_READY) return mw_sched_pushwake(L, why);
    if (j->err) {
        const char *msg = j->err == EAI_SYSTEM ? "resolver unavailable" : gai_strerror(j->err);
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", j->host, msg);
        lua_pushliteral(L, "dns");
        return 3;
    }
    lua_newtable(L);
    int n = 0;
    for (struct addrinfo *ai = j->res; ai; ai = ai->ai_next) {
        char buf[INET6_ADDRSTRLEN];
        int port;
        if (ai->ai_family == AF_INET) {
            struct sockaddr_in *sa = (struct sockaddr_in *)ai->ai_addr;
            inet_ntop(AF_INET, &sa->sin_addr, buf, sizeof buf);
            port = ntohs(sa->sin_port);
        } else if (ai->ai_family == AF_INET6) {
            struct sockaddr_in6 *sa = (struct sockaddr_in6 *)ai->ai_addr;
            inet_ntop(AF_INET6, &sa->sin6_addr, buf, sizeof buf);
            port = ntohs(sa->sin6_port);
        } else {
            continue;
        }
        lua_createtable(L, 0, 3);
        lua_pushstring(L, ai->ai_family == AF_INET ? "inet" : "inet6");
        lua_setfield(L, -2, "family");
        lua_pushstring(L, buf);
        lua_setfield(L, -2, "host");
        lua_pushinteger(L, port);
        lua_setfield(L, -2, "port");
        lua_rawseti(L, -2, ++n);
    }
    return 1;
}

static int l_resolve(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    const char *host = luaL_checkstring(L, 1);
    lua_Integer port = luaL_optinteger(L, 2, 0);
    luaL_argcheck(L, port >= 0 && port <= 65535, 2, "port out of range");
    int64_t d = mw_sched_deadline(L, rt, 3, -1);
    mw_task *t = mw_sched_self(L, rt);
    lua_settop(L, 3);
    mw_dnsjob *j = mw_dns_push(L, rt, host, (int)port, AF_UNSPEC);
    if (!j) return luaL_error(L, "not enough memory");
    return mw_dns_wait(L, t, j, d, resolve_k, 0);
}

void mw_dns_open(lua_State *L, int rtidx)
{
    lua_pushvalue(L, rtidx);
    lua_pushcclosure(L, l_resolve, 1);
    lua_setfield(L, -2, "resolve");
}
