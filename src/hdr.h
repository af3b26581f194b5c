/* hdr: HDR histograms (record, merge, percentiles) for moonwire bench.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_HDR_H
#define MW_HDR_H

#include <lua.h>

/* Registers the histogram type into the module table on top. */
void mw_hdr_open(lua_State *L);

#endif
