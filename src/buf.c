/* buf: see buf.h. Standard blocks come from and go back to the pool; larger buffers
 * (a long line, read("a")) are plain realloc'd memory freed when released. */
#include "buf.h"
#include "sanitize.h"

#include <stdlib.h>
#include <string.h>

#ifdef MW_SANITIZED
#define POOL_KEEP 0             /* sanitize.h: every block goes back to free() */
#else
#define POOL_KEEP MW_BUF_POOL_MAX
#endif

static char *pool_get(mw_buf_pool *p)
{
    if (p && p->n > 0) return p->blocks[--p->n];
    return malloc(MW_BUF_BLOCK);
}

static void give_back(mw_buf *b, mw_buf_pool *p)
{
    if (b->cap == MW_BUF_BLOCK && p && p->n < POOL_KEEP) p->blocks[p->n++] = b->data;
    else free(b->data);
    b->data = NULL;
    b->cap = b->r = b->w = 0;
}

char *mw_buf_reserve(mw_buf *b, mw_buf_pool *p, size_t need, size_t *avail)
{
    if (!b->data) {
        size_t cap = MW_BUF_BLOCK;
        if (need > cap) {
            while (cap < need) cap *= 2;
            b->data = malloc(cap);
        } else {
            b->data = pool_get(p);
        }
        if (!b->data) return NULL;
        b->cap = cap;
        b->r = b->w = 0;
    }
    if (b->cap - b->w < need && b->r > 0) {
        size_t len = b->w - b->r;
        memmove(b->data, b->data + b->r, len);
        b->r = 0;
        b->w = len;
    }
    if (b->cap - b->w < need) {
        size_t cap = b->cap;
        while (cap - b->w < need) cap *= 2;
        char *d;
        if (b->cap == MW_BUF_BLOCK) {
            /* a pooled block: copy out so the pool only ever holds standard blocks */
            d = malloc(cap);
            if (!d) return NULL;
            memcpy(d, b->data + b->r, b->w - b->r);
            b->w -= b->r;
            b->r = 0;
            give_back(&(mw_buf){ b->data, MW_BUF_BLOCK, 0, 0 }, p);
        } else {
            d = realloc(b->data, cap);
            if (!d) return NULL;
        }
        b->data = d;
        b->cap = cap;
    }
    if (avail) *avail = b->cap - b->w;
    return b->data + b->w;
}

void mw_buf_consume(mw_buf *b, size_t n)
{
    b->r += n;
    if (b->r >= b->w) b->r = b->w = 0;
}

void mw_buf_release(mw_buf *b, mw_buf_pool *p)
{
    if (b->data && b->r == b->w) give_back(b, p);
}

void mw_buf_free(mw_buf *b, mw_buf_pool *p)
{
    if (b->data) give_back(b, p);
}

void mw_buf_pool_free(mw_buf_pool *p)
{
    while (p->n > 0) free(p->blocks[--p->n]);
}
