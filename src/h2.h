/* h2: HTTP/2 server connections on libnghttp2 (H2Conn, H2Stream), see h2.c.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_H2_H
#define MW_H2_H

#include <lua.h>

#include "h2fields.h"

/* Registers h2_server, h2_preface and the H2Conn/H2Stream types into the table on top. */
void mw_h2_open(lua_State *L);
/* Appends the n name/value pairs of the flat table at idx to f, names lower-cased (trailers
 * to send; h2client.c uses it too). Raises on a bad entry or memory exhaustion. */
void mw_h2_fields_from(lua_State *L, int idx, int n, fields *f);
/* stream:set_trailers's core for both ends: the n pairs at idx become f (mw_h2_fields_from)
 * unless nghttp2 could not send them (h2_trailers_unfit): then f is left empty. Pushes true,
 * or nil, msg, "toolarge"; returns the number of values pushed. */
int mw_h2_set_trailers(lua_State *L, int idx, int n, fields *f);

#endif
