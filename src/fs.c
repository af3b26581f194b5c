/* fs: the few file-system calls the Lua layer needs (static files): stat, realpath and
 * open_file. Non-blocking-safe enough for local files; no Lua state kept here. */
#define _GNU_SOURCE
#include "fs.h"
#include "sched.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* stat(path) -> size, mtime (integer seconds), kind ("file"|"dir"|"other"), or nil, err, code */
static int l_stat(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    if (strlen(path) != len) return mw_pushfail(L, "path contains a NUL byte", "EINVAL");
    struct stat st;
    if (stat(path, &st) < 0) return mw_pusherrno(L, errno);
    lua_pushinteger(L, (lua_Integer)st.st_size);
    lua_pushinteger(L, (lua_Integer)st.st_mtime);
    lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "dir" : "other");
    return 3;
}

/* realpath(path) -> the canonical absolute path (symlinks resolved), or nil, err, code */
static int l_realpath(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    if (strlen(path) != len) return mw_pushfail(L, "path contains a NUL byte", "EINVAL");
    char *r = realpath(path, NULL);
    if (!r) return mw_pusherrno(L, errno);
    lua_pushstring(L, r);
    free(r);
    return 1;
}

/* The close of a file made by open_file (liolib's io_fclose, which is not exported). */
static int file_close(lua_State *L)
{
    luaL_Stream *p = luaL_checkudata(L, 1, LUA_FILEHANDLE);
    errno = 0;
    return luaL_fileresult(L, fclose(p->f) == 0, NULL);
}

/* open_file(path) -> file, size, or nil, err, code: a regular file open for reading, as an io
 * library file (f:read, f:seek, f:close, <close>; sock:sendfile takes it), and its size from
 * the open descriptor, so what is measured is what is sent whatever the name points to
 * later. res:sendfile opens before the head goes out: a failure can still be answered. The
 * open does not block: a fifo put in the file's place would stall the loop (it is refused,
 * as everything that is not a regular file: "not a regular file", "EINVAL"). */
static int l_open_file(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    if (strlen(path) != len) return mw_pushfail(L, "path contains a NUL byte", "EINVAL");
    /* made closed, then opened (liolib's newprefile): a memory error leaves no descriptor */
    luaL_Stream *p = lua_newuserdatauv(L, sizeof *p, 0);
    p->f = NULL;
    p->closef = NULL;
    if (luaL_getmetatable(L, LUA_FILEHANDLE) == LUA_TNIL) return luaL_error(L, "open_file needs the io library");
    lua_setmetatable(L, -2);
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return mw_pusherrno(L, errno);
    struct stat st;
    int e = 0;        /* -1: not a regular file */
    if (fstat(fd, &st) < 0) e = errno;
    else if (!S_ISREG(st.st_mode)) e = -1;
    else if ((p->f = fdopen(fd, "rb")) == NULL) e = errno;
    if (e != 0) {
        close(fd);
        return e < 0 ? mw_pushfail(L, "not a regular file", "EINVAL") : mw_pusherrno(L, e);
    }
    p->closef = file_close;
    lua_pushinteger(L, (lua_Integer)st.st_size);
    return 2;
}

void mw_fs_open(lua_State *L)
{
    static const luaL_Reg f[] = {
        { "stat", l_stat }, { "realpath", l_realpath }, { "open_file", l_open_file }, { NULL, NULL }
    };
    luaL_setfuncs(L, f, 0);
}
