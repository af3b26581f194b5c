/*
 * ws_load: WebSocket echo load generator, and idle-connection holder.
 *
 * Load (default):
 *   ws_load -p PORT [-H 127.0.0.1] [-c CONNS] [-d SECS] [-s SIZE] [-u PATH]
 * Opens CONNS connections (default 50), does the opening handshake on each
 * (checks the 101 and Sec-WebSocket-Accept), then on every connection: send one
 * masked SIZE-byte text frame (default 32, printable ASCII, a new payload each
 * time), wait for its whole echo (an unmasked text frame, checked byte for
 * byte), repeat, for SECS seconds (default 5). One thread, epoll. At the end
 * each connection gets a close frame (1000) and is closed.
 * Prints one line of key=value pairs on stdout:
 *   msgs=N secs=S msgs_per_s=R p50_us=.. p90_us=.. p99_us=.. p999_us=.. max_us=..
 *   errors=E conns=C size=B client_cpu_pct=P client_cpu_s=T
 * (latency: from the send of a message to the end of its echo; one message is
 * one round trip). Exit status 1 if a connection fails, breaks or echoes
 * wrong bytes, or no round trip was done.
 *
 * Hold (-i N):
 *   ws_load -p PORT -i N [-b BATCH] [-n NSRC] [-t SECS]
 * Opens N WebSocket connections (handshake done, nothing else sent), then holds
 * them idle until SIGTERM/SIGINT or SECS seconds (default 300). Connections
 * are opened BATCH at a time (default 200: written, then their answers read),
 * from source addresses 127.0.0.1 .. 127.0.0.NSRC (default 1; each address has
 * ~28,000 ephemeral ports). Prints
 *   holding n=N open_secs=S              once every handshake is done
 *   done held=N still_open=K closed_by_server=M      at the end
 * (a connection on which anything arrived, a close or a ping, counts as closed
 * by the server). Exit status 1 if a handshake fails.
 *
 *   cc -O2 -o ws_load ws_load.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_SIZE 125          /* payloads fit the 7-bit length: one-byte length frames */
#define HIST_US 1000000       /* 1 µs buckets up to 1 s */

/* RFC 6455's sample key and its accept value: every connection uses them. */
#define WS_KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define WS_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

struct conn {
    int fd, want_out;
    size_t sent, got;         /* bytes of the current frame sent / of its echo received */
    uint64_t seq, t0;
    unsigned char out[MAX_SIZE + 6];   /* the masked frame */
    unsigned char expect[MAX_SIZE + 2];/* the echo we expect */
};

static size_t msg_size = 32, frame_len, echo_len;
static uint32_t *hist;
static uint64_t hist_over, lat_max_ns, nmsgs, nerrors;
static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "ws_load: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(long i, const char *what)
{
    fprintf(stderr, "ws_load: connection %ld: %s%s%s\n", i, what, errno ? ": " : "", errno ? strerror(errno) : "");
    exit(1);
}

static char req[512];
static int reqlen;

/* Reads the handshake answer on a blocking socket: a 101 with the right
 * accept value, and nothing after the head. */
static void read_upgrade(int fd, long i)
{
    char buf[4096];
    size_t have = 0;
    for (;;) {
        ssize_t r = read(fd, buf + have, sizeof buf - 1 - have);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail(i, "reading the handshake answer");
        if (r == 0) { errno = 0; fail(i, "closed during the handshake"); }
        have += (size_t)r;
        buf[have] = 0;
        char *end = strstr(buf, "\r\n\r\n");
        if (!end) {
            if (have >= sizeof buf - 1) { errno = 0; fail(i, "handshake answer too long"); }
            continue;
        }
        errno = 0;
        if (strncmp(buf, "HTTP/1.1 101", 12) != 0) {
            char *eol = strstr(buf, "\r\n");
            if (eol) *eol = 0;
            fprintf(stderr, "ws_load: connection %ld: handshake answered '%s'\n", i, buf);
            exit(1);
        }
        int ok = 0;
        for (char *p = strstr(buf, "\r\n"); p && p < end; p = strstr(p, "\r\n")) {
            p += 2;
            if (strncasecmp(p, "sec-websocket-accept:", 21) == 0) {
                p += 21;
                while (*p == ' ' || *p == '\t') p++;
                ok = strncmp(p, WS_ACCEPT, strlen(WS_ACCEPT)) == 0;
                break;
            }
        }
        if (!ok) fail(i, "wrong or missing Sec-WebSocket-Accept");
        if ((size_t)(end + 4 - buf) != have) fail(i, "bytes after the handshake answer");
        return;
    }
}

/* A blocking connected socket, from source address 127.0.0.(1 + i % nsrc). */
static int open_conn(const struct sockaddr_in *dst, long i, int nsrc)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) fail(i, "socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = { 10, 0 };   /* no single read, write or connect waits longer */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (nsrc > 1) {
        struct sockaddr_in src;
        memset(&src, 0, sizeof src);
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7f000001u + (unsigned)(i % nsrc));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) fail(i, "bind");
    }
    if (connect(fd, (const struct sockaddr *)dst, sizeof *dst) < 0) fail(i, "connect");
    if (write(fd, req, (size_t)reqlen) != reqlen) fail(i, "writing the handshake");
    return fd;
}

/* ------------------------------------------------------------------ load */

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void)
{
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1Dull;
}

static void build_frame(struct conn *c)
{
    /* A different payload every time, so a server echoing stale bytes shows. */
    uint64_t m = next_rand();
    unsigned char mask[4] = { (unsigned char)m, (unsigned char)(m >> 8), (unsigned char)(m >> 16),
                              (unsigned char)(m >> 24) };
    c->out[0] = 0x81;                          /* FIN, text */
    c->out[1] = 0x80 | (unsigned char)msg_size;/* masked, length */
    memcpy(c->out + 2, mask, 4);
    c->expect[0] = 0x81;
    c->expect[1] = (unsigned char)msg_size;
    for (size_t i = 0; i < msg_size; i++) {
        if (i % 8 == 0) m = next_rand();
        unsigned char ch = (unsigned char)('!' + (m % 94));
        m /= 94;
        c->expect[2 + i] = ch;
        c->out[6 + i] = ch ^ mask[i & 3];
    }
}

static void set_out(int ep, struct conn *c, int on)
{
    if (c->want_out == on) return;
    struct epoll_event ev = { .events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c };
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->want_out = on;
}

static void broken(struct conn *c, const char *why)
{
    fprintf(stderr, "ws_load: connection fd %d: %s\n", c->fd, why);
    nerrors++;
    exit(1);
}

static void pump_out(int ep, struct conn *c)
{
    while (c->sent < frame_len) {
        ssize_t n = send(c->fd, c->out + c->sent, frame_len - c->sent, MSG_NOSIGNAL);
        if (n > 0) c->sent += (size_t)n;
        else if (n < 0 && errno == EINTR) continue;
        else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { set_out(ep, c, 1); return; }
        else broken(c, n < 0 ? strerror(errno) : "send returned 0");
    }
    set_out(ep, c, 0);
}

static void start_msg(int ep, struct conn *c)
{
    c->seq++;
    build_frame(c);
    c->sent = c->got = 0;
    c->t0 = now_ns();
    pump_out(ep, c);
}

static void on_in(int ep, struct conn *c, uint64_t deadline)
{
    unsigned char buf[4096];
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        broken(c, strerror(errno));
    }
    if (n == 0) broken(c, "closed by the server");
    if ((size_t)n > echo_len - c->got || memcmp(buf, c->expect + c->got, (size_t)n) != 0) {
        if (c->got == 0 && (buf[0] & 0x0f) == 0x8) broken(c, "the server sent a close frame");
        if (c->got == 0 && (buf[0] & 0x0f) == 0x9) broken(c, "the server sent a ping");
        broken(c, "the echo is not the frame expected");
    }
    c->got += (size_t)n;
    if (c->got < echo_len) return;
    uint64_t t = now_ns(), lat = t - c->t0, us = lat / 1000;
    if (us < HIST_US) hist[us]++;
    else hist_over++;
    if (lat > lat_max_ns) lat_max_ns = lat;
    nmsgs++;
    if (t < deadline) start_msg(ep, c);
}

static double percentile(double p)
{
    uint64_t total = nmsgs, rank = (uint64_t)(p * (double)total + 0.999999), seen = 0;
    if (total == 0) return 0;
    if (rank < 1) rank = 1;
    for (uint64_t i = 0; i < HIST_US; i++) {
        seen += hist[i];
        if (seen >= rank) return (double)i + 0.5;
    }
    return (double)lat_max_ns / 1000.0;
}

static int run_load(const struct sockaddr_in *dst, long nconns, double secs)
{
    hist = calloc(HIST_US, sizeof *hist);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    if (!hist || !conns) die("calloc");
    frame_len = msg_size + 6;
    echo_len = msg_size + 2;

    for (long i = 0; i < nconns; i++) conns[i].fd = open_conn(dst, i, 1);
    for (long i = 0; i < nconns; i++) read_upgrade(conns[i].fd, i);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    for (long i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        int fl = fcntl(c->fd, F_GETFL);
        if (fl < 0 || fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    }

    uint64_t start = now_ns(), deadline = start + (uint64_t)(secs * 1e9), end;
    for (long i = 0; i < nconns; i++) start_msg(ep, &conns[i]);
    struct epoll_event evs[512];
    for (;;) {
        end = now_ns();
        if (end >= deadline) break;
        int ms = (int)((deadline - end) / 1000000u) + 1;
        if (ms > 100) ms = 100;
        int n = epoll_wait(ep, evs, 512, ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (evs[i].events & EPOLLOUT) pump_out(ep, c);
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_in(ep, c, deadline);
        }
    }
    double elapsed = (double)(end - start) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                 (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    /* Polite ends: a masked close frame (1000), then close. */
    static const unsigned char close_frame[] = { 0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8 };
    for (long i = 0; i < nconns; i++) {
        send(conns[i].fd, close_frame, sizeof close_frame, MSG_NOSIGNAL | MSG_DONTWAIT);
        close(conns[i].fd);
    }
    printf("msgs=%llu secs=%.3f msgs_per_s=%.1f p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f "
           "errors=%llu conns=%ld size=%zu client_cpu_pct=%.0f client_cpu_s=%.3f\n",
           (unsigned long long)nmsgs, elapsed, (double)nmsgs / elapsed, percentile(0.50), percentile(0.90),
           percentile(0.99), percentile(0.999), (double)lat_max_ns / 1000.0, (unsigned long long)nerrors,
           nconns, msg_size, 100.0 * cpu / elapsed, cpu);
    fflush(stdout);
    return (nerrors || nmsgs == 0) ? 1 : 0;
}

/* ------------------------------------------------------------------ hold */

static int run_hold(const struct sockaddr_in *dst, long n, int batch, int nsrc, int hold)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && (rlim_t)n + 16 > rl.rlim_cur) {
        fprintf(stderr, "ws_load: %ld connections need more descriptors than the limit (%llu)\n", n,
                (unsigned long long)rl.rlim_cur);
        return 1;
    }
    int *fds = calloc((size_t)n, sizeof *fds);
    if (!fds) die("calloc");
    double t0 = (double)now_ns() / 1e9;
    for (long start = 0; start < n && !stop; start += batch) {
        long end = start + batch < n ? start + batch : n;
        for (long i = start; i < end; i++) fds[i] = open_conn(dst, i, nsrc);
        for (long i = start; i < end; i++) read_upgrade(fds[i], i);
    }
    if (stop) return 1;
    printf("holding n=%ld open_secs=%.2f\n", n, (double)now_ns() / 1e9 - t0);
    fflush(stdout);

    alarm((unsigned)hold);
    while (!stop) pause();

    long open = 0, closed = 0;
    for (long i = 0; i < n; i++) {
        struct pollfd p = { fds[i], POLLIN | POLLRDHUP, 0 };
        if (poll(&p, 1, 0) == 0) open++;
        else closed++;
    }
    printf("done held=%ld still_open=%ld closed_by_server=%ld\n", n, open, closed);
    fflush(stdout);
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: ws_load -p PORT [-H HOST] [-c CONNS] [-d SECS] [-s SIZE] [-u PATH]\n"
                    "       ws_load -p PORT [-H HOST] -i N [-b BATCH] [-n NSRC] [-t SECS]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *path = "/";
    int port = 0, opt, batch = 200, nsrc = 1, hold = 300;
    long nconns = 50, idle = 0;
    double secs = 5;
    while ((opt = getopt(argc, argv, "H:p:c:d:s:u:i:b:n:t:h")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': nconns = strtol(optarg, NULL, 10); break;
        case 'd': secs = strtod(optarg, NULL); break;
        case 's': msg_size = (size_t)strtoul(optarg, NULL, 10); break;
        case 'u': path = optarg; break;
        case 'i': idle = strtol(optarg, NULL, 10); break;
        case 'b': batch = atoi(optarg); break;
        case 'n': nsrc = atoi(optarg); break;
        case 't': hold = atoi(optarg); break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || nconns < 1 || nconns > 60000 || !(secs > 0 && secs < 3600) ||
        msg_size < 1 || msg_size > MAX_SIZE || idle < 0 || batch < 1 || nsrc < 1 || nsrc > 254 || hold < 1)
        usage();

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;      /* no SA_RESTART: pause() returns */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct sockaddr_in dst;
    memset(&dst, 0, sizeof dst);
    dst.sin_family = AF_INET;
    dst.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) {
        fprintf(stderr, "ws_load: bad IPv4 address %s\n", host);
        return 2;
    }
    reqlen = snprintf(req, sizeof req,
                      "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: " WS_KEY "\r\nSec-WebSocket-Version: 13\r\n\r\n",
                      path, host, port);
    if (reqlen <= 0 || reqlen >= (int)sizeof req) usage();

    if (idle > 0) return run_hold(&dst, idle, batch, nsrc, hold);
    return run_load(&dst, nconns, secs);
}
