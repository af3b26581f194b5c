/* dns: host name resolution on a small pool of threads, so a slow answer never stalls the
 * loop. A job is owned by a userdata on the waiting task's stack (mw_dns_push) and by the
 * resolver while it runs; whichever lets go last frees it. */
#ifndef MW_DNS_H
#define MW_DNS_H

#include "sched.h"
#include <netdb.h>

typedef struct mw_dnsjob {
    struct mw_resolver *r;
    char *host;
    char service[16];
    int family, socktype, flags;
    struct addrinfo *res;
    int err;                   /* getaddrinfo's result */
    int complete, in_done, orphaned;
    mw_task *waiter;
    struct mw_dnsjob *next;
} mw_dnsjob;

/* Pushes a job holder userdata for (host, port) and submits the job; NULL on memory
 * exhaustion of the C side (a Lua memory error raises). */
mw_dnsjob *mw_dns_push(lua_State *L, mw_rt *rt, const char *host, int port, int family);
/* Parks the running task until the job at the top-level index `idx` completes; then calls
 * k as mw_sched_wait does. Returns immediately (calling k) if it already completed. */
int mw_dns_wait(lua_State *L, mw_task *t, mw_dnsjob *j, int64_t deadline, lua_KFunction k,
                lua_KContext ctx);
void mw_resolver_free(mw_resolver *r);
void mw_dns_open(lua_State *L, int rtidx);

#endif
