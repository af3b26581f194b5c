/* core: luaopen_moonwire_core, above every layer. Creates (or finds) this lua_State's
 * runtime and registers each layer's functions, in layer order, with the runtime as their
 * upvalue. Nothing includes this file's symbols: each layer's open function is declared in
 * the layer's own header, and helpers the layers share live below them (mwlua.h). */
#include "alloc.h"
#include "sched.h"
#include "dns.h"
#include "net.h"
#include "stream.h"
#include "fs.h"
#include "http.h"
#include "h2.h"
#include "h2client.h"
#include "mwzlib.h"
#include "ws.h"
#include "tls.h"
#include "hdr.h"
#include "thread.h"
#include "pg.h"
#include "redis.h"

__attribute__((visibility("default"))) int luaopen_moonwire_core(lua_State *L);

#include <stdlib.h>

int luaopen_moonwire_core(lua_State *L)
{
#if defined(__SANITIZE_ADDRESS__)
    /* sanitizer test builds: the ASan runtime is preloaded into lua5.4 only; keep it
     * out of the programs the tests start (scripts/run-tests sets MW_ASAN_PRELOAD) */
    if (getenv("MW_ASAN_PRELOAD")) unsetenv("LD_PRELOAD");
#endif
    mw_alloc_install(L);
    mw_sched_newruntime(L);
    int rtidx = lua_gettop(L);
    lua_newtable(L);
    mw_sched_open(L, rtidx);
    mw_dns_open(L, rtidx);
    mw_net_open(L, rtidx);
    mw_stream_open(L, rtidx);
    mw_fs_open(L);
    mw_http_open(L);
    mw_h2_open(L);
    mw_h2client_open(L);
    mw_zlib_open(L);
    mw_ws_open(L);
    mw_tls_open(L);
    mw_hdr_open(L);
    mw_redis_open(L, rtidx);
    mw_thread_open(L, rtidx);
    mw_pg_open(L, rtidx);
    lua_pushcfunction(L, mw_alloc_name);
    lua_setfield(L, -2, "allocator");
    lua_pushliteral(L, "0.1.0");
    lua_setfield(L, -2, "version");
    return 1;
}
