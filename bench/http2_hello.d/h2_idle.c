/* h2_idle: opens N cleartext HTTP/2 connections (prior knowledge) to a server and holds
 * them idle until SIGTERM/SIGINT (or -t seconds). bench/http2_hello uses it to measure the
 * server's memory per idle HTTP/2 connection from a process other than the server (the
 * HTTP/1.1 side of the comparison is bench/http_hello.d/idle_hold.c, same output).
 *
 *   cc -O2 -o h2_idle h2_idle.c
 *   h2_idle -H 127.0.0.1 -p PORT -n 10000 [-q] [-b BATCH] [-s NSRC] [-t SECS]
 *
 * On each connection: the 24-byte preface and an empty SETTINGS frame (with -q also a GET /
 * on stream 1, HEADERS with END_STREAM), then frames are read until the server's SETTINGS
 * has come (answered with a SETTINGS ACK), ours has been acknowledged and (-q) the response
 * has ended (END_STREAM on stream 1, DATA counted). PING is answered; GOAWAY, RST_STREAM or
 * a close is an error.
 * -b: connections opened before their exchanges are read (default 200, under a listen
 *     backlog of 511);
 * -s: spread the connections over source addresses 127.0.0.1 .. 127.0.0.NSRC (default 1);
 * -t: stop holding after SECS seconds (default 300).
 * While holding, every connection is read as a browser's or Node's is (an event loop
 * watches it): a SETTINGS is acknowledged and a PING answered. (An idle moonwire connection
 * sends SETTINGS_HEADER_TABLE_SIZE 0 to empty its HPACK table: docs/http2.md.) A GOAWAY or
 * a close ends that connection's holding (it counts in closed_by_server).
 *
 * Output (stdout, one line each):
 *   holding n=N open_secs=S body_bytes=B
 *   done held=N still_open=K closed_by_server=M
 * Exit status 1 (message on stderr) if a connection fails.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, int i) {
    fprintf(stderr, "h2_idle: connection %d: %s%s%s\n", i, what, errno ? ": " : "",
            errno ? strerror(errno) : "");
    exit(1);
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* A GET / on stream 1 as curl sends it: :method GET (2), :path / (4), :scheme http (6) from
 * the HPACK static table, then :authority (1), user-agent (58) and accept (19) as literals
 * with incremental indexing, so that the server's HPACK decoder keeps them in its dynamic
 * table as it does for a browser's or curl's request. */
static const unsigned char get_headers[] = {
    0x82, 0x84, 0x86,
    0x41, 9, '1', '2', '7', '.', '0', '.', '0', '.', '1',
    0x7a, 9, 'h', '2', '_', 'i', 'd', 'l', 'e', '/', '1',
    0x53, 3, '*', '/', '*'};

struct conn {
    int fd;
    int state; /* bits: 1 server SETTINGS seen, 2 our SETTINGS acked, 4 response ended */
    unsigned char part[64]; /* while holding: the start of a frame not all read yet */
    size_t have;
};

/* While holding: reads what the server sent on one connection; acknowledges SETTINGS and
 * answers PING. Returns -1 once the connection is over (closed, GOAWAY, a frame too large
 * to be an idle connection's). */
static int hold_read(struct conn *c) {
    unsigned char buf[16384 + sizeof c->part];
    memcpy(buf, c->part, c->have);
    size_t have = c->have;
    ssize_t n = read(c->fd, buf + have, sizeof buf - have);
    if (n == 0) return -1;
    if (n < 0) return errno == EINTR || errno == EAGAIN ? 0 : -1;
    have += (size_t)n;
    size_t off = 0;
    while (have - off >= 9) {
        const unsigned char *f = buf + off;
        size_t len = (size_t)f[0] << 16 | (size_t)f[1] << 8 | f[2];
        if (have - off < 9 + len) {
            if (have - off > sizeof c->part) return -1;
            break;
        }
        unsigned type = f[3], flags = f[4];
        if (type == 4 && !(flags & 1)) {
            static const unsigned char ack[9] = {0, 0, 0, 4, 1, 0, 0, 0, 0};
            if (write_all(c->fd, ack, sizeof ack) < 0) return -1;
        } else if (type == 6 && !(flags & 1) && len == 8) {
            unsigned char pong[17];
            memcpy(pong, f, 17);
            pong[4] = 1;
            if (write_all(c->fd, pong, sizeof pong) < 0) return -1;
        } else if (type == 7) {
            return -1;
        }
        off += 9 + len;
    }
    memmove(c->part, buf + off, have - off);
    c->have = have - off;
    return 0;
}

/* Reads frames until the exchange is complete (returns the DATA bytes of stream 1). */
static long exchange(struct conn *c, int i, int want) {
    unsigned char buf[65536 + 9];
    size_t have = 0;
    long data = 0;
    while ((c->state & want) != want) {
        struct pollfd pfd = {c->fd, POLLIN, 0};
        int r = poll(&pfd, 1, 10000);
        if (r == 0) { errno = 0; die("no answer within 10 s", i); }
        if (r < 0) { if (errno == EINTR) continue; die("poll", i); }
        ssize_t n = read(c->fd, buf + have, sizeof buf - have);
        if (n == 0) { errno = 0; die("closed by the server", i); }
        if (n < 0) { if (errno == EINTR || errno == EAGAIN) continue; die("read", i); }
        have += (size_t)n;
        for (;;) {
            if (have < 9) break;
            size_t len = (size_t)buf[0] << 16 | (size_t)buf[1] << 8 | buf[2];
            if (len > 65536) { errno = 0; die("frame larger than 64 KiB", i); }
            if (have < 9 + len) break;
            unsigned type = buf[3], flags = buf[4];
            unsigned sid = ((unsigned)buf[5] & 0x7f) << 24 | (unsigned)buf[6] << 16 |
                           (unsigned)buf[7] << 8 | buf[8];
            if (type == 4) { /* SETTINGS */
                if (flags & 1) c->state |= 2;
                else {
                    static const unsigned char ack[9] = {0, 0, 0, 4, 1, 0, 0, 0, 0};
                    if (write_all(c->fd, ack, sizeof ack) < 0) die("write", i);
                    c->state |= 1;
                }
            } else if (type == 6 && !(flags & 1)) { /* PING */
                unsigned char pong[17];
                memcpy(pong, buf, 17);
                pong[4] = 1;
                if (len == 8 && write_all(c->fd, pong, sizeof pong) < 0) die("write", i);
            } else if (type == 7) {
                errno = 0; die("GOAWAY from the server", i);
            } else if (type == 3) {
                errno = 0; die("RST_STREAM from the server", i);
            } else if ((type == 0 || type == 1) && sid == 1) {
                if (type == 0) {
                    size_t pad = (flags & 8) && len > 0 ? (size_t)buf[9] + 1 : 0;
                    data += (long)(len - (pad <= len ? pad : len));
                }
                if (flags & 1) c->state |= 4;
            }
            memmove(buf, buf + 9 + len, have - 9 - len);
            have -= 9 + len;
        }
    }
    return data;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, n = 0, batch = 200, nsrc = 1, secs = 300, request = 0, opt;
    while ((opt = getopt(argc, argv, "H:p:n:b:s:t:q")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'n': n = atoi(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 's': nsrc = atoi(optarg); break;
        case 't': secs = atoi(optarg); break;
        case 'q': request = 1; break;
        default:
            fprintf(stderr, "usage: h2_idle -H HOST -p PORT -n N [-q] [-b BATCH] [-s NSRC] [-t SECS]\n");
            return 2;
        }
    }
    if (port <= 0 || n <= 0 || batch <= 0 || nsrc <= 0 || nsrc > 254) {
        fprintf(stderr, "h2_idle: -p and -n are needed (positive); -s 1..254\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);

    struct sockaddr_in to;
    memset(&to, 0, sizeof to);
    to.sin_family = AF_INET;
    to.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &to.sin_addr) != 1) { fprintf(stderr, "h2_idle: bad host\n"); return 2; }

    unsigned char hello[24 + 9 + 9 + sizeof get_headers];
    size_t hello_len = 0;
    memcpy(hello, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24);
    hello_len = 24;
    static const unsigned char settings[9] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
    memcpy(hello + hello_len, settings, 9);
    hello_len += 9;
    if (request) {
        unsigned char h[9] = {0, 0, (unsigned char)sizeof get_headers, 1, 0x5 /* END_STREAM|END_HEADERS */, 0, 0, 0, 1};
        memcpy(hello + hello_len, h, 9);
        hello_len += 9;
        memcpy(hello + hello_len, get_headers, sizeof get_headers);
        hello_len += sizeof get_headers;
    }
    int want = 1 | 2 | (request ? 4 : 0);

    struct conn *cs = calloc((size_t)n, sizeof *cs);
    if (!cs) { perror("calloc"); return 1; }
    double t0 = now();
    long body = 0;
    for (int first = 0; first < n && !stop; first += batch) {
        int last = first + batch < n ? first + batch : n;
        for (int i = first; i < last; i++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd < 0) die("socket", i);
            if (nsrc > 1) {
                struct sockaddr_in from;
                memset(&from, 0, sizeof from);
                from.sin_family = AF_INET;
                from.sin_addr.s_addr = htonl(0x7f000001u + (unsigned)(i % nsrc));
                if (bind(fd, (struct sockaddr *)&from, sizeof from) < 0) die("bind", i);
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0) die("connect", i);
            if (write_all(fd, hello, hello_len) < 0) die("write", i);
            cs[i].fd = fd;
        }
        for (int i = first; i < last; i++) body += exchange(&cs[i], i, want);
    }
    if (stop) { fprintf(stderr, "h2_idle: interrupted while opening\n"); return 1; }
    printf("holding n=%d open_secs=%.2f body_bytes=%ld\n", n, now() - t0, body);
    fflush(stdout);

    alarm((unsigned)secs);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) { perror("epoll_create1"); return 1; }
    for (int i = 0; i < n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) { perror("epoll_ctl"); return 1; }
    }
    while (!stop) {
        struct epoll_event evs[256];
        int k = epoll_wait(ep, evs, 256, -1);
        if (k < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        for (int j = 0; j < k; j++) {
            struct conn *c = &cs[evs[j].data.u32];
            if (c->fd >= 0 && hold_read(c) < 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->fd = -1;
            }
        }
    }

    int still = 0;
    for (int i = 0; i < n; i++) {
        char c;
        if (cs[i].fd < 0) continue;
        ssize_t r = recv(cs[i].fd, &c, 1, MSG_DONTWAIT | MSG_PEEK);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) still++;
    }
    printf("done held=%d still_open=%d closed_by_server=%d\n", n, still, n - still);
    return 0;
}
