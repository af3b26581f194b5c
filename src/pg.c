/* pg: PostgreSQL on libpq's asynchronous API (see pg.h). The connection's socket is in
 * the loop (edge-triggered); the event callback only wakes tasks. Queries are slots in a
 * FIFO ring owned by the connection: a slot is sent with its own Sync (so a failing query
 * aborts nothing but itself), and completes when its PGRES_PIPELINE_SYNC arrives. One
 * waiting task at a time drives the connection (flushes, reads, completes slots and wakes
 * their tasks); the others park until their slot completes. COPY runs outside pipeline
 * mode while the Lua layer holds the connection exclusively. */
#define _GNU_SOURCE
#include "pg.h"
#include "mwlua.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>
#include <openssl/ssl.h>

#define PG_MT "moonwire.PgConn"
#define BROKEN_CODE "08006"      /* SQLSTATE connection_failure */

enum { SLOT_FREE, SLOT_PENDING, SLOT_DONE, SLOT_ABANDONED };

typedef struct pg_slot {
    mw_task *waiter;
    PGresult *res;             /* the first error, else the last result */
    int state;
    int gotnull;               /* the query's results ended (NULL); its Sync comes next */
    int synced;                /* its Sync arrived (else it completed because of a failure) */
    int nocancel;              /* given up, it is not cancelled (BEGIN, COMMIT, a sync) */
    int64_t deadline;
} pg_slot;

typedef struct mw_pg {
    mw_io io;                  /* first: the event callback casts */
    mw_rt *rt;
    PGconn *c;
    int registered;
    int broken;                /* failed or closed: every slot completes with errmsg */
    unsigned cancels;          /* cancel requests sent (a pool retires such a connection) */
    int connected;
    char *errmsg;
    pg_slot *q;
    uint64_t cap, head, recv, tail;  /* done-not-taken [head,recv), in flight [recv,tail) */
    mw_task *driver;           /* the task that waits on the socket for everyone */
    mw_task *nwait;            /* a task waiting for a notification */
    int want_write;            /* the driver waits for writability too */
    PGnotify *nhead, *ntail;
    double timeout;            /* per query, seconds; < 0: none */
} mw_pg;

static char pg_null;           /* its address is pg.null */

/* ---- loop integration ---------------------------------------------------------------- */

static pg_slot *slot(mw_pg *p, uint64_t seq);

static void on_event(mw_io *io, uint32_t ev)
{
    mw_pg *p = (mw_pg *)io;
    if (p->driver) {
        mw_sched_wake(p->driver, MW_WAKE_READY);
    } else {
        /* nobody drives (the driver left with its result and the next has not run
         * yet): the first waiting task takes over, so no readiness is lost */
        for (uint64_t s = p->recv; s < p->tail; s++) {
            mw_task *w = slot(p, s)->waiter;
            if (w && w->state == MW_T_WAITING) { mw_sched_wake(w, MW_WAKE_READY); break; }
        }
    }
    if (p->nwait && (ev & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)))
        mw_sched_wake(p->nwait, MW_WAKE_READY);
}

/* (Re-)registers libpq's current socket: it may change while connecting, and a closed
 * one left epoll by itself. EEXIST: still the same, still registered. */
static void reg(mw_pg *p)
{
    int fd = PQsocket(p->c);
    if (fd < 0) { p->registered = 0; p->io.fd = -1; return; }
    if (p->registered && fd == p->io.fd) {
        uint32_t ev = p->io.events;
        if (mw_loop_add(&p->rt->loop, &p->io) == 0 || errno == EEXIST) { p->io.events = ev; return; }
    }
    p->io.fd = fd;
    p->registered = mw_loop_add(&p->rt->loop, &p->io) == 0 || errno == EEXIST;
}

static void unreg(mw_pg *p)
{
    /* libpq closes its socket on a lost connection (PQsocket is then -1): the kernel
     * dropped it from epoll, and its number may be someone else's by now */
    if (p->registered && p->c && PQsocket(p->c) == p->io.fd) mw_loop_del(&p->rt->loop, &p->io);
    p->registered = 0;
    p->io.fd = -1;
}

/* Whether a read may find something now that edge-triggered epoll would not report
 * again: libpq does not read its socket dry, and OpenSSL may hold decrypted bytes. */
static int ready_now(mw_pg *p)
{
    SSL *ssl = PQgetssl(p->c);
    if (ssl && SSL_pending(ssl) > 0) return 1;
    struct pollfd pfd = { .fd = PQsocket(p->c), .events = POLLIN };
    return pfd.fd >= 0 && poll(&pfd, 1, 0) > 0;
}


/* A waiting task leaves (woken, or ended by mw.stop): no pointer to it stays behind.
 * A task that comes back to wait for its slot records itself again. */
static void unwait(mw_task *t)
{
    mw_pg *p = t->wait_obj;
    if (p->driver == t) p->driver = NULL;
    if (p->nwait == t) p->nwait = NULL;
    for (uint64_t s = p->head; s < p->tail; s++) {
        pg_slot *sl = slot(p, s);
        if (sl->waiter == t) sl->waiter = NULL;
    }
}

/* Parks t as the connection's driver (or notification waiter) until the socket is ready. */
static int park(lua_State *L, mw_pg *p, mw_task *t, int as_nwait, int64_t d, lua_KFunction k,
                lua_KContext ctx)
{
    if (as_nwait) p->nwait = t;
    else p->driver = t;
    t->wait_obj = p;
    t->unwait = unwait;
    return mw_sched_wait(L, t, d, k, ctx);
}

/* ---- the slot ring ------------------------------------------------------------------ */

static pg_slot *slot(mw_pg *p, uint64_t seq) { return &p->q[seq & (p->cap - 1)]; }

static pg_slot *push_slot(lua_State *L, mw_pg *p, uint64_t *seq)
{
    if (p->tail - p->head == p->cap) {
        uint64_t ncap = p->cap ? p->cap * 2 : 16;
        pg_slot *nq = calloc(ncap, sizeof *nq);
        if (!nq) { luaL_error(L, "not enough memory"); return NULL; }
        for (uint64_t s = p->head; s < p->tail; s++) nq[s & (ncap - 1)] = *slot(p, s);
        free(p->q);
        p->q = nq;
        p->cap = ncap;
    }
    *seq = p->tail++;
    pg_slot *sl = slot(p, *seq);
    memset(sl, 0, sizeof *sl);
    sl->state = SLOT_PENDING;
    return sl;
}

static void advance_head(mw_pg *p)
{
    while (p->head < p->recv && slot(p, p->head)->state == SLOT_FREE) p->head++;
}

/* Completes the slot at recv: its task is woken, an abandoned one's result dropped. */
static void complete(mw_pg *p)
{
    pg_slot *sl = slot(p, p->recv++);
    if (sl->state == SLOT_ABANDONED) {
        PQclear(sl->res);
        sl->res = NULL;
        sl->state = SLOT_FREE;
        advance_head(p);
        return;
    }
    sl->state = SLOT_DONE;
    if (sl->waiter) mw_sched_wake(sl->waiter, MW_WAKE_READY);
}

/* The connection is lost (or closed): every slot in flight completes with errmsg. */
static void set_broken(mw_pg *p, const char *msg)
{
    if (!p->broken) {
        p->broken = 1;
        free(p->errmsg);
        size_t n = strlen(msg);
        while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) n--;
        p->errmsg = strndup(n ? msg : "connection lost", n ? n : 15);
        unreg(p);
    }
    while (p->recv < p->tail) complete(p);
    if (p->driver) mw_sched_wake(p->driver, MW_WAKE_READY);
    if (p->nwait) mw_sched_wake(p->nwait, MW_WAKE_READY);
}

/* Wakes the first task still waiting for a slot, when nobody drives the connection. */
static void elect(mw_pg *p)
{
    if (p->driver || p->broken) return;
    for (uint64_t s = p->recv; s < p->tail; s++) {
        mw_task *w = slot(p, s)->waiter;
        if (w && w->state == MW_T_WAITING) { mw_sched_wake(w, MW_WAKE_READY); return; }
    }
}

/* Reads what arrived and completes the slots whose results are all in. Pipeline mode. */
static void pump(mw_pg *p)
{
    if (p->broken) return;
    if (!PQconsumeInput(p->c)) { set_broken(p, PQerrorMessage(p->c)); return; }
    PGnotify *n;
    while ((n = PQnotifies(p->c))) {
        n->next = NULL;
        if (p->ntail) p->ntail->next = n;
        else p->nhead = n;
        p->ntail = n;
    }
    if (p->nhead && p->nwait) mw_sched_wake(p->nwait, MW_WAKE_READY);
    while (p->recv < p->tail && !PQisBusy(p->c)) {
        PGresult *r = PQgetResult(p->c);
        pg_slot *sl = slot(p, p->recv);
        if (!r) {
            if (sl->gotnull) break;       /* nothing more yet */
            sl->gotnull = 1;
            continue;
        }
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(r);
            sl->synced = 1;
            complete(p);
            continue;
        }
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT) {
            /* a COPY sent as a query: libpq hands out its COPY result again on every call
             * (this loop would never end), and the server waits for COPY data (or sends
             * rows) where the next result should come. Only copy_from/copy_to run COPY */
            PQclear(r);
            set_broken(p, "COPY needs copy_from/copy_to (connection discarded)");
            return;
        }
        sl->gotnull = 0;
        if (sl->res && PQresultStatus(sl->res) == PGRES_FATAL_ERROR) PQclear(r);
        else { PQclear(sl->res); sl->res = r; }
    }
    if (PQstatus(p->c) == CONNECTION_BAD) set_broken(p, PQerrorMessage(p->c));
}

/* ---- cancel: PQcancel blocks (it connects), so it runs on a short-lived thread --------- */

static void *cancel_main(void *arg)
{
    char err[256];
    PQcancel(arg, err, sizeof err);
    PQfreeCancel(arg);
    return NULL;
}

static int send_cancel(mw_pg *p)
{
    if (p->broken || !p->c) return -1;
    PGcancel *cc = PQgetCancel(p->c);
    if (!cc) return -1;
    pthread_t th;
    pthread_attr_t attr;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    int rc = pthread_create(&th, &attr, cancel_main, cc);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) { PQfreeCancel(cc); return -1; }
    p->cancels++;
    return 0;
}

/* ---- results to Lua --------------------------------------------------------------- */

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void push_bytea(lua_State *L, const char *s, size_t n)
{
    if (n >= 2 && s[0] == '\\' && s[1] == 'x') {
        luaL_Buffer b;
        size_t m = (n - 2) / 2;
        char *out = luaL_buffinitsize(L, &b, m);
        size_t k = 0;
        for (size_t i = 2; i + 1 < n; i += 2) {
            int hi = hexval((unsigned char)s[i]), lo = hexval((unsigned char)s[i + 1]);
            if (hi < 0 || lo < 0) break;
            out[k++] = (char)(hi << 4 | lo);
        }
        luaL_pushresultsize(&b, k);
        return;
    }
    lua_pushlstring(L, s, n);   /* the escape format (bytea_output = escape): as sent */
}

enum { T_TEXT, T_INT, T_FLOAT, T_BOOL, T_BYTEA, T_JSON };

static int scalar_kind(Oid oid)
{
    switch (oid) {
    case 20: case 21: case 23: case 26: return T_INT;
    case 700: case 701: return T_FLOAT;
    case 16: return T_BOOL;
    case 17: return T_BYTEA;
    case 114: case 3802: return T_JSON;
    default: return T_TEXT;
    }
}

/* the element kind of a one-or-more dimensional array type, or -1 */
static int array_kind(Oid oid)
{
    switch (oid) {
    case 1005: case 1007: case 1016: case 1028: return T_INT;
    case 1021: case 1022: return T_FLOAT;
    case 1000: return T_BOOL;
    /* text, varchar, bpchar, "char", name, uuid, numeric (1019 is path[], not name[]) */
    case 1009: case 1015: case 1014: case 1002: case 1003: case 2951: case 1231: return T_TEXT;
    case 1001: return T_BYTEA;
    case 199: case 3807: return T_JSON;
    default: return -1;
    }
}

/* Pushes the text value s[0..n) as `kind`; json goes through the decoder at `dec` (0: none). */
static void push_scalar(lua_State *L, int kind, const char *s, size_t n, int dec)
{
    switch (kind) {
    case T_INT: {
        char *end;
        errno = 0;
        long long v = strtoll(s, &end, 10);
        if (errno == 0 && end == s + n) lua_pushinteger(L, (lua_Integer)v);
        else lua_pushlstring(L, s, n);
        return;
    }
    case T_FLOAT: lua_pushnumber(L, strtod(s, NULL)); return;
    case T_BOOL: lua_pushboolean(L, n > 0 && s[0] == 't'); return;
    case T_BYTEA: push_bytea(L, s, n); return;
    case T_JSON:
        if (dec) {
            lua_pushvalue(L, dec);
            lua_pushlstring(L, s, n);
            lua_call(L, 1, 1);
            return;
        }
        lua_pushlstring(L, s, n);
        return;
    default: lua_pushlstring(L, s, n); return;
    }
}

/* Parses a text-format array literal at *ps ("{1,2,{3,NULL}}", quoted elements with
 * backslash escapes) into a Lua table; NULL elements are pg.null. */
static void push_array(lua_State *L, const char **ps, const char *end, int kind, int dec, luaL_Buffer *b)
{
    const char *s = *ps;
    luaL_checkstack(L, 4, "array too deep");
    lua_newtable(L);
    if (s < end && *s == '[') {            /* explicit bounds "[0:2]={...}" */
        while (s < end && *s != '=') s++;
        if (s < end) s++;
    }
    if (s >= end || *s != '{') { *ps = end; return; }
    s++;
    lua_Integer i = 0;
    while (s < end && *s != '}') {
        if (*s == '{') {
            push_array(L, &s, end, kind, dec, b);
        } else if (*s == '"') {
            s++;
            luaL_buffinit(L, b);
            while (s < end && *s != '"') {
                if (*s == '\\' && s + 1 < end) s++;
                luaL_addchar(b, *s);
                s++;
            }
            s++;
            luaL_pushresult(b);
            size_t n;
            const char *v = lua_tolstring(L, -1, &n);
            push_scalar(L, kind, v, n, dec);
            lua_remove(L, -2);
        } else {
            const char *e = s;
            while (e < end && *e != ',' && *e != '}') e++;
            if (e - s == 4 && memcmp(s, "NULL", 4) == 0) lua_pushlightuserdata(L, &pg_null);
            else push_scalar(L, kind, s, (size_t)(e - s), dec);
            s = e;
        }
        lua_rawseti(L, -2, ++i);
        if (s < end && *s == ',') s++;
    }
    if (s < end) s++;                      /* '}' */
    *ps = s;
}

/* Pushes a failed result: nil, message, sqlstate, { fields }; returns 4. */
static int push_error(lua_State *L, const PGresult *r)
{
    static const struct { int code; const char *name; } fields[] = {
        { PG_DIAG_SEVERITY_NONLOCALIZED, "severity" }, { PG_DIAG_SQLSTATE, "sqlstate" },
        { PG_DIAG_MESSAGE_PRIMARY, "message" }, { PG_DIAG_MESSAGE_DETAIL, "detail" },
        { PG_DIAG_MESSAGE_HINT, "hint" }, { PG_DIAG_STATEMENT_POSITION, "position" },
        { PG_DIAG_INTERNAL_POSITION, "internal_position" },
        { PG_DIAG_INTERNAL_QUERY, "internal_query" }, { PG_DIAG_CONTEXT, "context" },
        { PG_DIAG_SCHEMA_NAME, "schema" }, { PG_DIAG_TABLE_NAME, "table" },
        { PG_DIAG_COLUMN_NAME, "column" }, { PG_DIAG_DATATYPE_NAME, "datatype" },
        { PG_DIAG_CONSTRAINT_NAME, "constraint" },
    };
    const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    lua_pushnil(L);
    lua_pushstring(L, msg ? msg : PQresultErrorMessage(r));
    lua_pushstring(L, state ? state : "XX000");
    lua_createtable(L, 0, 4);
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        const char *v = PQresultErrorField(r, fields[i].code);
        if (!v) continue;
        if (fields[i].code == PG_DIAG_STATEMENT_POSITION || fields[i].code == PG_DIAG_INTERNAL_POSITION)
            lua_pushinteger(L, atoi(v));
        else
            lua_pushstring(L, v);
        lua_setfield(L, -2, fields[i].name);
    }
    return 4;
}

/* Pushes a result: rows keyed by column name (res.affected: the row count the command
 * reported), or the failure (push_error). `self` is the connection's stack index. */
static int push_result(lua_State *L, int self, const PGresult *r)
{
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK && st != PGRES_SINGLE_TUPLE &&
        st != PGRES_EMPTY_QUERY)
        return push_error(L, r);
    int nrows = PQntuples(r), ncols = PQnfields(r);
    luaL_checkstack(L, ncols + 8, "too many columns");
    lua_getiuservalue(L, self, 1);         /* the json decoder or nil */
    int dec = lua_isnil(L, -1) ? 0 : lua_gettop(L);
    int names = lua_gettop(L) + 1;
    int kinds[64], akinds[64];
    for (int c = 0; c < ncols; c++) {
        lua_pushstring(L, PQfname(r, c));
        if (c < 64) {
            Oid oid = PQftype(r, c);
            kinds[c] = scalar_kind(oid);
            akinds[c] = array_kind(oid);
        }
    }
    lua_createtable(L, nrows, 1);
    luaL_Buffer b;
    for (int row = 0; row < nrows; row++) {
        lua_createtable(L, 0, ncols);
        for (int c = 0; c < ncols; c++) {
            lua_pushvalue(L, names + c);
            if (PQgetisnull(r, row, c)) {
                lua_pushlightuserdata(L, &pg_null);
            } else {
                const char *v = PQgetvalue(r, row, c);
                size_t n = (size_t)PQgetlength(r, row, c);
                int ak = c < 64 ? akinds[c] : array_kind(PQftype(r, c));
                if (PQfformat(r, c) == 1) lua_pushlstring(L, v, n);
                else if (ak >= 0) push_array(L, &v, v + n, ak, dec, &b);
                else push_scalar(L, c < 64 ? kinds[c] : scalar_kind(PQftype(r, c)), v, n, dec);
            }
            lua_rawset(L, -3);
        }
        lua_rawseti(L, -2, row + 1);
    }
    if (st == PGRES_COMMAND_OK) {          /* the command tag: "INSERT 0 1", "ROLLBACK" */
        lua_pushstring(L, PQcmdStatus((PGresult *)r));
        lua_setfield(L, -2, "command");
    }
    const char *aff = PQcmdTuples((PGresult *)r);
    if (aff && *aff) {
        lua_pushinteger(L, (lua_Integer)strtoll(aff, NULL, 10));
        lua_setfield(L, -2, "affected");
    }
    lua_replace(L, dec ? dec : names - 1);
    lua_settop(L, dec ? dec : names - 1);
    return 1;
}

/* ---- the connection object ------------------------------------------------------- */

static mw_pg *checkpg(lua_State *L)
{
    mw_pg *p = luaL_checkudata(L, 1, PG_MT);
    if (!p->c) luaL_error(L, "attempt to use a closed PostgreSQL connection");
    return p;
}

static int pg_close(lua_State *L)
{
    mw_pg *p = luaL_checkudata(L, 1, PG_MT);
    if (!p->c) return 0;
    set_broken(p, "connection closed");
    for (uint64_t s = p->head; s < p->tail; s++) {
        pg_slot *sl = slot(p, s);
        PQclear(sl->res);
        sl->res = NULL;
        if (sl->state == SLOT_DONE && !sl->waiter) sl->state = SLOT_FREE;
    }
    while (p->nhead) {
        PGnotify *n = p->nhead;
        p->nhead = n->next;
        PQfreemem(n);
    }
    p->ntail = NULL;
    unreg(p);
    PQfinish(p->c);
    p->c = NULL;
    free(p->q);
    p->q = NULL;
    p->cap = p->head = p->recv = p->tail = 0;
    free(p->errmsg);
    p->errmsg = NULL;
    return 0;
}

static int fail_broken(lua_State *L, mw_pg *p)
{
    lua_pushnil(L);
    lua_pushstring(L, p->errmsg ? p->errmsg : "connection lost");
    lua_pushliteral(L, BROKEN_CODE);
    return 3;
}

/* -- connecting -- */

static int connect_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_pg *p = lua_touserdata(L, 2);
    mw_rt *rt = p->rt;
    mw_task *t = rt->current;
    int64_t d = (int64_t)ctx;
    (void)status;
    int why = mw_sched_reason(t);
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) {
        lua_pushcfunction(L, pg_close);
        lua_pushvalue(L, 2);
        lua_call(L, 1, 0);
        if (why == MW_WAKE_TIMEOUT) return mw_pushfail(L, "connection timed out", "timeout");
        return mw_sched_pushwake(L, why);
    }
    for (;;) {
        PostgresPollingStatusType ps = PQconnectPoll(p->c);
        reg(p);
        if (ps == PGRES_POLLING_OK) {
            if (PQsetnonblocking(p->c, 1) != 0 || !PQenterPipelineMode(p->c)) break;
            p->connected = 1;
            lua_settop(L, 2);
            return 1;
        }
        if (ps == PGRES_POLLING_FAILED || !p->registered) break;
        /* readiness already seen is no news for libpq's next step: wait for an edge,
         * unless the socket is ready right now */
        struct pollfd pfd = { .fd = p->io.fd, .events = ps == PGRES_POLLING_WRITING ? POLLOUT : POLLIN };
        SSL *ssl = PQgetssl(p->c);
        if ((ssl && SSL_pending(ssl) > 0) || poll(&pfd, 1, 0) > 0) continue;
        return park(L, p, t, 0, d, connect_k, ctx);
    }
    const char *msg = PQerrorMessage(p->c);
    lua_pushnil(L);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) n--;
    lua_pushlstring(L, msg, n);
    lua_pushliteral(L, BROKEN_CODE);
    lua_pushcfunction(L, pg_close);
    lua_pushvalue(L, 2);
    lua_call(L, 1, 0);
    return 3;
}

/* the server's notices (NOTICE, WARNING) are not printed to stderr */
static void quiet(void *arg, const char *msg) { (void)arg; (void)msg; }

/* libpq enforces connect_timeout (conninfo, URL or PGCONNECT_TIMEOUT) only in its blocking
 * connect: the deadline it gives, whole seconds as libpq reads them (0 or less, or not a
 * number: none), else d */
static int64_t conninfo_deadline(mw_pg *p, int64_t d)
{
    PQconninfoOption *opts = PQconninfo(p->c);
    if (!opts) return d;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (strcmp(o->keyword, "connect_timeout") != 0 || !o->val) continue;
        char *end;
        errno = 0;
        long s = strtol(o->val, &end, 10);
        while (*end == ' ' || *end == '\t') end++;
        if (end != o->val && !*end && errno == 0 && s > 0) d = mw_sched_after(p->rt, (double)s);
        break;
    }
    PQconninfoFree(opts);
    return d;
}

/* connect(conninfo [, timeout]) -> conn | nil, msg, code; no timeout: the conninfo's */
static int l_connect(lua_State *L)
{
    mw_rt *rt = mw_rt_up(L);
    const char *info = luaL_checkstring(L, 1);
    int64_t d = mw_sched_deadline(L, rt, 2, -1);
    int own_timeout = lua_isnoneornil(L, 2);
    mw_task *t = mw_sched_self(L, rt);
    lua_settop(L, 1);
    mw_pg *p = lua_newuserdatauv(L, sizeof *p, 1);
    memset(p, 0, sizeof *p);
    p->io.fd = -1;
    p->io.on_event = on_event;
    p->rt = rt;
    p->timeout = -1;
    luaL_setmetatable(L, PG_MT);
    p->c = PQconnectStart(info);
    if (!p->c) return luaL_error(L, "not enough memory");
    PQsetNoticeProcessor(p->c, quiet, NULL);
    if (own_timeout) d = conninfo_deadline(p, d);
    if (PQstatus(p->c) == CONNECTION_BAD) {
        t->wake = MW_WAKE_READY;
        return connect_k(L, LUA_YIELD, (lua_KContext)d);
    }
    reg(p);
    return park(L, p, t, 0, d, connect_k, (lua_KContext)d);
}

/* push_result under lua_pcall, taking r with it: a json decoder that raises (or a memory
 * error) must not leak the PGresult. Pushes what push_result pushes; raises its error after
 * PQclear. The connection is at index `self`. */
static int push_result_p(lua_State *L)
{
    return push_result(L, 1, lua_touserdata(L, 2));
}

static int push_result_owned(lua_State *L, int self, PGresult *r)
{
    int base = lua_gettop(L);
    lua_pushcfunction(L, push_result_p);
    lua_pushvalue(L, self);
    lua_pushlightuserdata(L, r);
    int rc = lua_pcall(L, 2, LUA_MULTRET, 0);
    PQclear(r);
    if (rc != LUA_OK) return lua_error(L);
    return lua_gettop(L) - base;
}

/* -- pipelined requests -- */

/* The continuation of a request waiting for slot `ctx`; the connection is at index 1. */
static int request_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_pg *p = lua_touserdata(L, 1);
    mw_task *t = p->rt->current;
    uint64_t seq = (uint64_t)ctx;
    (void)status;
    int why = mw_sched_reason(t);
    pg_slot *sl = p->c ? slot(p, seq) : NULL;
    if (!sl) return mw_pushfail(L, "connection closed", BROKEN_CODE);
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE && sl->state != SLOT_DONE) {
        /* timeout or cancel: its result will be dropped on arrival. The server is told to
         * stop only when this query is the one it runs now and no other query waits
         * behind it: a cancel request acts on whatever the server runs when it arrives,
         * and if this query ended just before, that would be the next task's query */
        sl->waiter = NULL;
        if (sl->state == SLOT_PENDING) {
            sl->state = SLOT_ABANDONED;
            if (seq == p->recv && p->tail == seq + 1 && !sl->nocancel) send_cancel(p);
        }
        elect(p);
        return mw_sched_pushwake(L, why);
    }
    for (;;) {
        if (sl->state == SLOT_DONE) {
            PGresult *r = sl->res;
            int synced = sl->synced;
            sl->res = NULL;
            sl->waiter = NULL;
            sl->state = SLOT_FREE;
            advance_head(p);
            elect(p);
            if (!r && !synced) return fail_broken(L, p);
            if (!r) { lua_pushboolean(L, 1); return 1; }   /* sync() */
            return push_result_owned(L, 1, r);
        }
        if (p->broken) return fail_broken(L, p);  /* not reached: broken completes all */
        if (p->driver && p->driver != t) {
            sl->waiter = t;                 /* passive: the driver completes the slot */
            t->wait_obj = p;
            t->unwait = unwait;
            return mw_sched_wait(L, t, sl->deadline, request_k, ctx);
        }
        int fl = PQflush(p->c);
        if (fl < 0) { set_broken(p, PQerrorMessage(p->c)); continue; }
        pump(p);
        if (sl->state == SLOT_DONE || p->broken) continue;
        if (ready_now(p)) continue;
        sl->waiter = t;
        return park(L, p, t, 0, sl->deadline, request_k, ctx);
    }
}

/* Converts the parameters at [first, top] for PQsendQueryParams (kept on the stack). */
typedef struct pg_params {
    int n;
    const char **values;
    int *lengths, *formats;
} pg_params;

static void build_params(lua_State *L, int first, pg_params *pp)
{
    int top = lua_gettop(L);
    int n = top >= first ? top - first + 1 : 0;
    if (n > 65535) luaL_error(L, "too many parameters");
    pp->n = n;
    char *mem = lua_newuserdatauv(L, (size_t)n * (sizeof(char *) + 2 * sizeof(int)) + 1, 0);
    pp->values = (const char **)mem;
    pp->lengths = (int *)(mem + (size_t)n * sizeof(char *));
    pp->formats = pp->lengths + n;
    luaL_checkstack(L, n + 4, "too many parameters");
    for (int i = 0; i < n; i++) {
        int idx = first + i;
        size_t len = 0;
        pp->formats[i] = 0;
        pp->lengths[i] = 0;
        switch (lua_type(L, idx)) {
        case LUA_TNIL: pp->values[i] = NULL; break;
        case LUA_TLIGHTUSERDATA:
            if (lua_touserdata(L, idx) != &pg_null) luaL_argerror(L, idx, "unsupported parameter type");
            pp->values[i] = NULL;
            break;
        case LUA_TBOOLEAN: pp->values[i] = lua_toboolean(L, idx) ? "t" : "f"; break;
        case LUA_TNUMBER:
            if (lua_isinteger(L, idx)) {
                pp->values[i] = lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, idx));
            } else {
                char buf[64];
                double v = lua_tonumber(L, idx);
                if (v != v) snprintf(buf, sizeof buf, "NaN");
                else if (v > 1e308 * 10) snprintf(buf, sizeof buf, "Infinity");
                else if (v < -1e308 * 10) snprintf(buf, sizeof buf, "-Infinity");
                else snprintf(buf, sizeof buf, "%.17g", v);
                pp->values[i] = lua_pushstring(L, buf);
            }
            break;
        case LUA_TSTRING:
            pp->values[i] = lua_tolstring(L, idx, &len);
            if (memchr(pp->values[i], 0, len)) {  /* NULs: binary format (bytea) */
                pp->formats[i] = 1;
                pp->lengths[i] = (int)len;
            }
            break;
        case LUA_TTABLE:                 /* pg.bytea(s): { bytea = s }, binary format */
            if (lua_getfield(L, idx, "bytea") == LUA_TSTRING) {
                pp->values[i] = lua_tolstring(L, -1, &len);
                pp->formats[i] = 1;
                pp->lengths[i] = (int)len;
                break;
            }
            /* fallthrough */
        default:
            luaL_argerror(L, idx, lua_pushfstring(L, "unsupported parameter type %s", luaL_typename(L, idx)));
        }
    }
}

enum { REQ_QUERY, REQ_PREPARED, REQ_PREPARE, REQ_SYNC, REQ_CONTROL };

static int request(lua_State *L, int kind)
{
    mw_pg *p = checkpg(L);
    mw_rt *rt = p->rt;
    mw_task *t = mw_sched_self(L, rt);
    if (p->broken) return fail_broken(L, p);
    if (!p->connected || PQpipelineStatus(p->c) == PQ_PIPELINE_OFF)
        return luaL_error(L, "the connection is in exclusive use (COPY)");
    int ok = 1;
    switch (kind) {
    case REQ_QUERY: {
        const char *sql = luaL_checkstring(L, 2);
        pg_params pp;
        build_params(L, 3, &pp);
        ok = PQsendQueryParams(p->c, sql, pp.n, NULL, pp.values, pp.lengths, pp.formats, 0);
        break;
    }
    case REQ_PREPARED: {
        const char *name = luaL_checkstring(L, 2);
        pg_params pp;
        build_params(L, 3, &pp);
        ok = PQsendQueryPrepared(p->c, name, pp.n, pp.values, pp.lengths, pp.formats, 0);
        break;
    }
    case REQ_CONTROL:
        ok = PQsendQueryParams(p->c, luaL_checkstring(L, 2), 0, NULL, NULL, NULL, NULL, 0);
        break;
    case REQ_PREPARE:
        ok = PQsendPrepare(p->c, luaL_checkstring(L, 2), luaL_checkstring(L, 3), 0, NULL);
        break;
    default: break;
    }
    uint64_t seq;
    if (!ok) {                      /* nothing queued: the connection is unusable */
        if (PQstatus(p->c) == CONNECTION_BAD) { set_broken(p, PQerrorMessage(p->c)); return fail_broken(L, p); }
        return mw_pushfail(L, PQerrorMessage(p->c), "08000");
    }
    if (!PQpipelineSync(p->c)) {    /* a query queued without its Sync: results would not
                                     * match the slots any more */
        set_broken(p, PQerrorMessage(p->c));
        return fail_broken(L, p);
    }
    pg_slot *sl = push_slot(L, p, &seq);
    sl->deadline = mw_sched_after(rt, p->timeout);
    sl->nocancel = kind == REQ_SYNC || kind == REQ_CONTROL;
    sl->waiter = t;
    lua_settop(L, 1);
    t->wake = MW_WAKE_NONE;
    return request_k(L, LUA_YIELD, (lua_KContext)seq);
}

/* conn:query(sql, ...) -> rows | nil, msg, sqlstate, fields */
static int pg_query(lua_State *L) { return request(L, REQ_QUERY); }
/* conn:query_prepared(name, ...) -> as query */
static int pg_query_prepared(lua_State *L) { return request(L, REQ_PREPARED); }
/* conn:prepare(name, sql) -> rows (empty) | nil, msg, sqlstate, fields */
static int pg_prepare(lua_State *L) { return request(L, REQ_PREPARE); }
/* conn:sync() -> waits until every request sent before it completed */
static int pg_sync(lua_State *L) { return request(L, REQ_SYNC); }
/* conn:control(sql) -> as query, without parameters; a wait given up does not cancel it:
 * the transaction's own statements, which must run (or settle after) whatever happens */
static int pg_control(lua_State *L) { return request(L, REQ_CONTROL); }

/* conn:set_timeout(seconds|nil), conn:set_decoder(fn|nil) */
static int pg_set_timeout(lua_State *L)
{
    mw_pg *p = checkpg(L);
    p->timeout = luaL_optnumber(L, 2, -1);
    return 0;
}

static int pg_set_decoder(lua_State *L)
{
    checkpg(L);
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    lua_setiuservalue(L, 1, 1);
    return 0;
}

/* conn:cancel() -> true: asks the server to stop what the connection runs now */
static int pg_cancel(lua_State *L)
{
    mw_pg *p = checkpg(L);
    lua_pushboolean(L, send_cancel(p) == 0);
    return 1;
}

/* conn:discard(msg): marks the connection broken (queries fail with msg, 08006), for a
 * connection whose state is unknown (moonwire.pg could not finish what a task left) */
static int pg_discard(lua_State *L)
{
    mw_pg *p = luaL_checkudata(L, 1, PG_MT);
    if (p->c) set_broken(p, luaL_optstring(L, 2, "connection discarded"));
    return 0;
}

/* conn:check() -> as status(), after reading what an idle connection received: nobody
 * reads an idle socket, so a server that went away (FATAL, then EOF) is seen only by the
 * next query. One poll(fd, 0), and reads only when something is there. */
static int pg_status(lua_State *L);
static int pg_check(lua_State *L)
{
    mw_pg *p = luaL_checkudata(L, 1, PG_MT);
    if (p->c && !p->broken && p->connected && p->recv == p->tail && !p->driver &&
        PQpipelineStatus(p->c) != PQ_PIPELINE_OFF)
        for (int i = 0; i < 4 && !p->broken && ready_now(p); i++) pump(p);
    return pg_status(L);
}

/* conn:status() -> "ok" | "broken", inflight, cancels (the cancel requests sent so far) */
static int pg_status(lua_State *L)
{
    mw_pg *p = luaL_checkudata(L, 1, PG_MT);
    lua_pushstring(L, !p->c ? "closed" : p->broken ? "broken" : "ok");
    lua_pushinteger(L, (lua_Integer)(p->tail - p->recv));
    lua_pushinteger(L, (lua_Integer)p->cancels);
    return 3;
}

/* conn:txstatus() -> "idle" | "active" | "intrans" | "inerror" | "unknown" */
static int pg_txstatus(lua_State *L)
{
    static const char *const names[] = { "idle", "active", "intrans", "inerror", "unknown" };
    mw_pg *p = checkpg(L);
    PGTransactionStatusType st = PQtransactionStatus(p->c);
    lua_pushstring(L, names[st <= PQTRANS_UNKNOWN ? st : PQTRANS_UNKNOWN]);
    return 1;
}

/* -- notifications -- */

static int notification_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_pg *p = lua_touserdata(L, 1);
    mw_task *t = p->rt->current;
    (void)status;
    int why = mw_sched_reason(t);
    if (!p->c) return mw_pushfail(L, "connection closed", BROKEN_CODE);
    for (;;) {
        if (p->nhead) {
            PGnotify *n = p->nhead;
            p->nhead = n->next;
            if (!p->nhead) p->ntail = NULL;
            lua_pushstring(L, n->relname);
            lua_pushstring(L, n->extra);
            lua_pushinteger(L, n->be_pid);
            PQfreemem(n);
            return 3;
        }
        if (p->broken) return fail_broken(L, p);
        if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
        if (PQpipelineStatus(p->c) == PQ_PIPELINE_OFF) return park(L, p, t, 1, (int64_t)ctx, notification_k, ctx);
        pump(p);
        if (p->nhead || p->broken) continue;
        if (ready_now(p)) continue;
        return park(L, p, t, 1, (int64_t)ctx, notification_k, ctx);
    }
}

/* conn:notification([timeout]) -> channel, payload, pid | nil, msg, code */
static int pg_notification(lua_State *L)
{
    mw_pg *p = checkpg(L);
    int64_t d = mw_sched_deadline(L, p->rt, 2, -1);
    mw_task *t = mw_sched_self(L, p->rt);
    if (p->nwait) return luaL_error(L, "another task waits for notifications");
    lua_settop(L, 1);
    t->wake = MW_WAKE_NONE;
    return notification_k(L, LUA_YIELD, (lua_KContext)d);
}

/* -- exclusive mode: COPY (the Lua layer holds the connection and drained it) -- */

/* conn:x_begin(sql): leaves pipeline mode and sends sql (simple protocol) */
static int pg_x_begin(lua_State *L)
{
    mw_pg *p = checkpg(L);
    const char *sql = luaL_checkstring(L, 2);
    if (p->broken) return fail_broken(L, p);
    if (p->recv != p->tail || !PQexitPipelineMode(p->c))
        return luaL_error(L, "x_begin: the connection has requests in flight");
    if (!PQsendQuery(p->c, sql)) {
        PQenterPipelineMode(p->c);
        return mw_pushfail(L, PQerrorMessage(p->c), BROKEN_CODE);
    }
    lua_pushboolean(L, 1);
    return 1;
}

enum { X_RESULT, X_GET, X_PUT, X_END };

/* One non-blocking step of an exclusive operation; returns 1 when the caller must wait
 * (p->want_write says for what), 0 when done with values pushed (*nres). */
static int x_step(lua_State *L, mw_pg *p, int op, int *nres)
{
    if (p->broken) { *nres = fail_broken(L, p); return 0; }
    int fl = PQflush(p->c);
    if (fl < 0) { set_broken(p, PQerrorMessage(p->c)); *nres = fail_broken(L, p); return 0; }
    p->want_write = fl == 1;
    switch (op) {
    case X_PUT: {
        size_t n;
        const char *data = lua_tolstring(L, 2, &n);
        int r = PQputCopyData(p->c, data, (int)n);
        if (r < 0) { *nres = mw_pushfail(L, PQerrorMessage(p->c), BROKEN_CODE); return 0; }
        if (r == 0) { p->want_write = 1; return 1; }
        lua_pushboolean(L, 1);
        *nres = 1;
        return 0;
    }
    case X_END: {
        if (lua_tointeger(L, 3) == 0) {     /* the end not yet queued */
            const char *err = lua_tostring(L, 2);
            int r = PQputCopyEnd(p->c, err);
            if (r < 0) { *nres = mw_pushfail(L, PQerrorMessage(p->c), BROKEN_CODE); return 0; }
            if (r == 0) { p->want_write = 1; return 1; }
            lua_pushinteger(L, 1);
            lua_replace(L, 3);
            fl = PQflush(p->c);
        }
        if (fl == 1 || (fl = PQflush(p->c)) == 1) { p->want_write = 1; return 1; }
        if (fl < 0) { set_broken(p, PQerrorMessage(p->c)); *nres = fail_broken(L, p); return 0; }
        lua_pushboolean(L, 1);
        *nres = 1;
        return 0;
    }
    case X_GET: {
        char *buf = NULL;
        int r = PQgetCopyData(p->c, &buf, 1);
        if (r == 0) {
            if (!PQconsumeInput(p->c)) { set_broken(p, PQerrorMessage(p->c)); *nres = fail_broken(L, p); return 0; }
            r = PQgetCopyData(p->c, &buf, 1);
        }
        if (r > 0) {
            lua_pushlstring(L, buf, (size_t)r);
            PQfreemem(buf);
            *nres = 1;
            return 0;
        }
        if (r == 0) return ready_now(p) ? x_step(L, p, op, nres) : 1;
        if (r == -1) { lua_pushboolean(L, 0); *nres = 1; return 0; }
        *nres = mw_pushfail(L, PQerrorMessage(p->c), BROKEN_CODE);
        return 0;
    }
    default: {                              /* X_RESULT */
        if (PQisBusy(p->c)) {
            if (!PQconsumeInput(p->c)) { set_broken(p, PQerrorMessage(p->c)); *nres = fail_broken(L, p); return 0; }
            if (PQisBusy(p->c)) return ready_now(p) ? x_step(L, p, op, nres) : 1;
        }
        PGresult *r = PQgetResult(p->c);
        if (!r) {                             /* the end: back to pipeline mode */
            if (!PQenterPipelineMode(p->c)) { *nres = mw_pushfail(L, PQerrorMessage(p->c), BROKEN_CODE); return 0; }
            lua_pushboolean(L, 0);
            *nres = 1;
            return 0;
        }
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT) {
            lua_pushstring(L, st == PGRES_COPY_IN ? "copy_in" : "copy_out");
            *nres = 1;
            PQclear(r);
        } else {
            *nres = push_result_owned(L, 1, r);
        }
        if (PQstatus(p->c) == CONNECTION_BAD) set_broken(p, PQerrorMessage(p->c));
        return 0;
    }
    }
}

static int x_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_pg *p = lua_touserdata(L, 1);
    mw_task *t = p->rt->current;
    (void)status;
    if (!p->c) return mw_pushfail(L, "connection closed", BROKEN_CODE);
    int why = mw_sched_reason(t);
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) {
        /* the Lua layer finishes the COPY in a task of its own: a COPY FROM is aborted
         * (its end says so), a COPY TO stopped (pg.lua's stop_copy_out: a cancel sent
         * here could arrive after the COPY's end and stop the next statement) */
        return mw_sched_pushwake(L, why);
    }
    int nres = 0;
    if (x_step(L, p, (int)ctx, &nres)) return park(L, p, t, 0, MW_NO_DEADLINE, x_k, ctx);
    return nres;
}

static int x_op(lua_State *L, int op)
{
    mw_pg *p = checkpg(L);
    mw_sched_self(L, p->rt);
    if (p->connected && PQpipelineStatus(p->c) != PQ_PIPELINE_OFF)
        return luaL_error(L, "the connection is not in exclusive mode");
    if (op == X_PUT) luaL_checkstring(L, 2);
    if (op == X_END) { lua_settop(L, 2); lua_pushinteger(L, 0); }
    p->rt->current->wake = MW_WAKE_NONE;
    return x_k(L, LUA_YIELD, op);
}

/* conn:x_result() -> "copy_in" | "copy_out" | rows | false (no more: back in pipeline mode) */
static int pg_x_result(lua_State *L) { return x_op(L, X_RESULT); }
/* conn:copy_get() -> chunk | false at the end */
static int pg_copy_get(lua_State *L) { return x_op(L, X_GET); }
/* conn:copy_put(data) -> true */
static int pg_copy_put(lua_State *L) { return x_op(L, X_PUT); }
/* conn:copy_end([errmsg]) -> true (then x_result gives the command's result) */
static int pg_copy_end(lua_State *L) { return x_op(L, X_END); }

/* conn:copy_drain() -> true (the COPY TO's rows ended) | false (more are coming) | nil, msg,
 * code: drops the rows that arrived, without waiting. Bounded: a server that sends faster
 * than this reads is stopped by a cancel instead */
static int pg_copy_drain(lua_State *L)
{
    mw_pg *p = checkpg(L);
    if (PQpipelineStatus(p->c) != PQ_PIPELINE_OFF)
        return luaL_error(L, "the connection is not in exclusive mode");
    if (p->broken) return fail_broken(L, p);
    for (int i = 0; i < 64; i++) {
        char *buf = NULL;
        int r;
        while ((r = PQgetCopyData(p->c, &buf, 1)) > 0) PQfreemem(buf);
        if (r == -1) { lua_pushboolean(L, 1); return 1; }
        if (r < -1) return mw_pushfail(L, PQerrorMessage(p->c), BROKEN_CODE);
        if (!ready_now(p)) break;
        if (!PQconsumeInput(p->c)) { set_broken(p, PQerrorMessage(p->c)); return fail_broken(L, p); }
    }
    lua_pushboolean(L, 0);
    return 1;
}

/* pg.escape_identifier(conn, s) */
static int pg_escape_identifier(lua_State *L)
{
    mw_pg *p = checkpg(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    char *e = PQescapeIdentifier(p->c, s, n);
    if (!e) return mw_pushfail(L, PQerrorMessage(p->c), "22000");
    lua_pushstring(L, e);
    PQfreemem(e);
    return 1;
}

static int pg_tostring(lua_State *L)
{
    mw_pg *p = luaL_checkudata(L, 1, PG_MT);
    lua_pushfstring(L, "PgConn (%s)", !p->c ? "closed" : p->broken ? "broken" : "ok");
    return 1;
}

void mw_pg_open(lua_State *L, int rtidx)
{
    static const luaL_Reg methods[] = {
        { "query", pg_query }, { "query_prepared", pg_query_prepared },
        { "prepare", pg_prepare }, { "sync", pg_sync }, { "control", pg_control }, { "discard", pg_discard }, { "check", pg_check }, { "close", pg_close },
        { "set_timeout", pg_set_timeout }, { "set_decoder", pg_set_decoder },
        { "cancel", pg_cancel }, { "status", pg_status }, { "txstatus", pg_txstatus }, { "notification", pg_notification },
        { "x_begin", pg_x_begin }, { "x_result", pg_x_result }, { "copy_get", pg_copy_get },
        { "copy_put", pg_copy_put }, { "copy_end", pg_copy_end }, { "copy_drain", pg_copy_drain },
        { "escape_identifier", pg_escape_identifier },
        { NULL, NULL },
    };
    if (luaL_newmetatable(L, PG_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, pg_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, pg_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, pg_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, rtidx);
    lua_pushcclosure(L, l_connect, 1);
    lua_setfield(L, -2, "connect");
    lua_pushlightuserdata(L, &pg_null);
    lua_setfield(L, -2, "null");
    lua_pushinteger(L, PQlibVersion());
    lua_setfield(L, -2, "libpq_version");
    lua_setfield(L, -2, "pg");
}
