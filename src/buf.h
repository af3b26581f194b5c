/* buf: a growable byte buffer with reserve / commit / consume, and a small per-runtime pool
 * of standard-size blocks so that idle connections hold no buffer memory.
 * Readable bytes are data[r, w); free space is data[w, cap). Lua-free. */
#ifndef MW_BUF_H
#define MW_BUF_H

#include <stddef.h>

#define MW_BUF_BLOCK 16384
#define MW_BUF_POOL_MAX 256

typedef struct mw_buf {
    char *data;
    size_t cap, r, w;
} mw_buf;

typedef struct mw_buf_pool {
    char *blocks[MW_BUF_POOL_MAX];
    int n;
} mw_buf_pool;

static inline size_t mw_buf_len(const mw_buf *b) { return b->w - b->r; }
/* (an empty buffer may have no block: NULL, never NULL + 0) */
static inline const char *mw_buf_head(const mw_buf *b) { return b->data ? b->data + b->r : b->data; }

/* Makes room for at least `need` more bytes (compacting, then growing) and returns the
 * write position, or NULL when memory is exhausted. *avail gets the free space. */
char *mw_buf_reserve(mw_buf *b, mw_buf_pool *p, size_t need, size_t *avail);
static inline void mw_buf_commit(mw_buf *b, size_t n) { b->w += n; }
void mw_buf_consume(mw_buf *b, size_t n);
/* Gives the memory back (to the pool when it is a standard block) if the buffer is empty. */
void mw_buf_release(mw_buf *b, mw_buf_pool *p);
/* Frees whatever the buffer holds, data included. */
void mw_buf_free(mw_buf *b, mw_buf_pool *p);
void mw_buf_pool_free(mw_buf_pool *p);

#endif
