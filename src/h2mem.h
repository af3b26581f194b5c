/* h2mem: the allocator (nghttp2_mem) of a server connection's nghttp2 session, so that an
 * idle HTTP/2 connection keeps few pages resident. The session struct (a page of its own) and
 * the blocks of 1 KiB or more that nghttp2 makes while it creates the session (the HPACK
 * rings, the table of the stream map, the 16 KiB output frame buffer) go to a region of pages
 * mapped for the session; mw_h2mem_trim gives back the pages that hold nothing the session
 * needs (MADV_DONTNEED), and mw_h2mem_stow the others, their live words copied to the heap
 * until the session is used again (mw_h2mem_unstow).
 * The small blocks nghttp2 makes while it reads the client's frames go, when they fit, to the
 * spare half of the rings' page (the area), given back with it. Everything else is malloc's.
 * Lua-free; h2.c owns the calls. */
#ifndef MW_H2MEM_H
#define MW_H2MEM_H

#include <nghttp2/nghttp2.h>
#include <stddef.h>
#include <stdint.h>

#define MW_H2MEM_AREA_MAX 512

typedef struct mw_h2mem {
    nghttp2_mem hooks;         /* what nghttp2_session_server_new3 takes (mem_user_data: this) */
    int creating;              /* in mw_h2mem_begin .. _end: 1 + the allocations made so far */
    /* set by the caller: its last nghttp2_session_mem_send returned 0 and its output was
     * copied. Only mem_send packs frames into the frame buffer, and when it has returned 0
     * (a server session, no NO_COPY data, no PAUSE) it has reset the buffer: the next frame
     * is written from its start before anything reads it. Its bytes are dead until then. */
    int drained;
    unsigned char *region;     /* mapped at the first block, unmapped by mw_h2mem_free */
    size_t used;               /* bytes of the region handed out (a bump pointer) */
    size_t frame_off, frame_len;  /* the frame buffer's whole pages in the region (len 0: none) */
    /* per page of the region: the HPACK rings in it (blocks of RING bytes, the size nghttp2's
     * hd_ringbuf_init makes for a 4 KiB table), and the other blocks smaller than a page */
    unsigned char rings[9], others[9];  /* (REGION_PAGES in h2mem.c) */
    int nrings;
    size_t ring_off[2];        /* where the first two rings went */
    /* The spare half of the rings' page (nghttp2 1.52 puts its two 1 KiB rings alone on one):
     * blocks nghttp2 makes after creation, up to MW_H2MEM_AREA_MAX bytes, come from here when
     * they fit, in granules of 32 bytes (bit k of `ause`: granule k is taken; of `astart`: a
     * block begins there). What a request leaves behind while the connection idles (the HPACK
     * tables' entries, the decoded fields that fill them) then sits on the page that
     * mw_h2mem_trim_hpack gives back, not in holes of the heap. (Blocks made while sending, a
     * response's, go to the heap: a bitmap's search costs more than a recycled block.) */
    unsigned char *area;       /* NULL: no such page (another layout, or a client session) */
    uint64_t ause, astart;
    int feeding;               /* set by the caller around nghttp2_session_mem_recv: only blocks
                                * made then (a request's stream, its decoded fields, the table
                                * entries they make) go to the area */
    unsigned ngran;            /* granules in the area (at most 64) */
    /* mw_h2mem_stow's copy of the pages it gave back: their live words that differ from the
     * template's prediction (h2mem.c), in runs (a uint64_t word index << 32 | count, then
     * the words; a count of 0 ends it); NULL when none */
    uint64_t *stowed;
    uint32_t stowed_pages;     /* bit k: page k was stowed (poisoned under ASan) */
} mw_h2mem;

/* Sets the hooks up (the struct must not move while a session uses it). */
void mw_h2mem_init(mw_h2mem *m);
/* Brackets nghttp2_session_server_new3: only blocks made in between go to the region;
 * mw_h2mem_end finds the area (when the rings' page is laid out as 1.52 does). */
static inline void mw_h2mem_begin(mw_h2mem *m) { m->creating = 1; }
void mw_h2mem_end(mw_h2mem *m);
/* Gives back the pages of the frame buffer (when `drained`) and the region's other pages
 * that hold only zero bytes (a MADV_DONTNEED page reads back as zeros), but the rings' page
 * when it has an area (mw_h2mem_trim_hpack's). Returns the bytes given back (resident or
 * not). */
size_t mw_h2mem_trim(mw_h2mem *m);
/* Gives back the pages that hold the two HPACK rings and nothing else, when no block of the
 * area is taken. Only when the caller has seen both HPACK tables empty
 * (nghttp2_session_get_hd_inflate_dynamic_table_size and _deflate_ both 0): nghttp2 reads a
 * ring's slots below its length only, and writes a slot before it reads it, so an empty
 * ring's bytes are dead, as a free granule's are. Returns the bytes given back. */
size_t mw_h2mem_trim_hpack(mw_h2mem *m);
/* Stows an idle session: the region's pages (the frame buffer's aside: mw_h2mem_trim's) go
 * back, what they hold that the session still needs copied to one heap block first (a few
 * hundred bytes where the pages are 12 KiB: the session struct's page, the rings' page with
 * the area's live blocks, the stream map's table; only the words that differ from the first
 * session the process stowed, its pointers into its own pages moved to these). Dead bytes
 * are not kept (they may come back as the template's): the area's free
 * granules, and the rings' slots when `hpack_dead` (the caller has seen both HPACK tables
 * empty, as for mw_h2mem_trim_hpack). After this NOTHING may read or write the session (no
 * nghttp2 call on it, no block of it) before mw_h2mem_unstow: the session struct reads as
 * zeros. h2.c reaches its session through one accessor that unstows first (`make lint`
 * refuses a call that does not); under ASan the stowed pages are poisoned, so that our own
 * code's use is reported (nghttp2's is not instrumented: it would read a session of zeros).
 * Returns the bytes given back (0: nothing stowed, e.g. no memory for the copy). */
size_t mw_h2mem_stow(mw_h2mem *m, int hpack_dead);
/* Puts a stowed session's words back (a page fault per page): the session is as it was. */
void mw_h2mem_unstow(mw_h2mem *m);
/* Unmaps the region: after nghttp2_session_del (or a failed creation) only. */
void mw_h2mem_free(mw_h2mem *m);

/* The heap blocks behind the hooks, for the glue's own per-stream structs too: malloc's,
 * small ones (up to 512 bytes) recycled through per-thread lists by size class; any block
 * from malloc may be released here. A client session uses the hooks without a region
 * (mw_h2mem_init, no begin/end): only this. */
void *mw_h2mem_alloc(size_t size);
void mw_h2mem_release(void *ptr);

#endif
