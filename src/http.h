/* http: HTTP/1.1 on llhttp: connections (HttpConn), request and response heads.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_HTTP_H
#define MW_HTTP_H

#include <lua.h>
#include <stddef.h>

/* Registers HttpConn and the head builders into the module table on top. */
void mw_http_open(lua_State *L);
/* Whether a response has no body, nor a Content-Length or Transfer-Encoding for one: 1xx,
 * 204, 304 (which may keep a length), and a 2xx to CONNECT (connect: it answers one). The
 * one rule of every send path, HTTP/1.1 and HTTP/2. */
int mw_http_bodyless(lua_Integer status, int connect);
/* Pushes s[0, n) with its %XX escapes decoded (a request path; h2.c uses it too). */
void mw_http_push_decoded(lua_State *L, const char *s, size_t n);
/* A header field seen again: appends v to req._multi[name] (the request at reqidx, the name
 * at kidx, its first value at oldidx; creates the list with that first value). Leaves the
 * stack as it found it. h2.c uses it too. */
void mw_http_add_multi(lua_State *L, int reqidx, int kidx, int oldidx, const char *v, size_t vn);
/* Raises unless k[0, kn) is a field name (a token) and v[0, vn) a value that may go on the
 * wire (no CR, LF or NUL): the one check of a request's header and trailer fields, HTTP/1.1
 * (http_request_head) and HTTP/2 (h2client.c), so both refuse the same misuse alike. */
void mw_http_check_field(lua_State *L, const char *k, size_t kn, const char *v, size_t vn);
/* Raises unless m[0, mn) is a request method (a token), for both versions alike. */
void mw_http_check_method(lua_State *L, const char *m, size_t mn);

#endif
