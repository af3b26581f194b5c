/* stream: the buffered byte stream over a socket (net.h) or a TLS session: reads with
 * io.read's patterns, gathered writes with backpressure, the output buffer written before
 * each poll. Above net, below tls, http and ws. */
#ifndef MW_STREAM_H
#define MW_STREAM_H

#include "net.h"

/* The bytes gathered in s->obuf go out first: 1 all written (the buffer is released), 0
 * some left (EAGAIN; *want: the readiness to wait for), -1 error (errno). */
int mw_sock_flush(mw_sock *s, uint32_t *want);
/* The transport's writev, after what s->obuf holds (-1 with EAGAIN while some of that is
 * left). Every write to a stream goes through here. */
ssize_t mw_sock_writev(mw_sock *s, const struct iovec *iov, int n, uint32_t *want);
/* Appends a and b to s->obuf and marks s dirty (written before the loop polls): 0, or -1
 * when memory is exhausted (nothing appended). */
int mw_sock_gather(mw_sock *s, const char *a, size_t an, const char *b, size_t bn);

/* Reads once from the transport into s->rbuf (room for at least `hint` bytes): 1 got
 * bytes, 0 end of stream (s->eof set), -1 would block (*want: readiness to wait for),
 * -3 error (errno). */
int mw_stream_fill(mw_sock *s, size_t hint, uint32_t *want);
/* Looks, without blocking, at an idle connection (no reader on it): MW_PROBE_QUIET (open,
 * nothing waiting), MW_PROBE_DATA (bytes waiting, in s->rbuf or the transport: over TLS
 * records that carry no data are read through first, and the start of a record whose rest
 * is on the way counts as data), MW_PROBE_END (the peer closed it: s->eof, or EOF seen now),
 * MW_PROBE_ERROR (errno). The one check behind s:alive() and the pools' checks (redis). */
enum { MW_PROBE_QUIET, MW_PROBE_DATA, MW_PROBE_END, MW_PROBE_ERROR };
int mw_stream_probe(mw_sock *s);
/* Pushes nil, message, code for an I/O error of s (a transport's protocol error gives
 * "tls: reason", "tls"). */
int mw_stream_pusherr(lua_State *L, mw_sock *s, int err);
/* Adds the stream methods (read, recv, write, sendfile) to the Socket type that net made,
 * and registers the runtime's before_poll (write the dirty sockets' output) and
 * sock_output hooks. After mw_net_open. */
void mw_stream_open(lua_State *L, int rtidx);

#endif
