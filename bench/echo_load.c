/*
 * echo_load: closed-loop load generator for TCP echo servers.
 *
 *   echo_load [-H host] [-p port] [-c conns] [-d seconds] [-s size]
 *
 * Opens `conns` connections (default 100) to host:port (default 127.0.0.1),
 * then on each one: send a `size`-byte message (default 32), wait until the
 * whole message has come back (and check it byte for byte), repeat, for
 * `seconds` (default 5). One thread, epoll, level-triggered.
 *
 * Prints one line of key=value pairs on stdout, e.g.
 *   rt=512345 secs=5.000 rt_per_s=102469.0 p50_us=950.5 p90_us=1100.5 p99_us=1310.5
 *   p999_us=2500.5 max_us=4022.1 errors=0 conns=100 size=32 client_cpu_pct=61
 *   client_cpu_s=3.050
 * (one line; client_cpu_* is this process's own CPU use, utime + stime). Exit status 0 on success, 1 if anything went wrong (connect
 * failed, a connection broke or echoed wrong bytes, no round trip done).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 65536
#define HIST_US 1000000 /* 1 µs buckets up to 1 s; slower ones go in `over` */

struct conn {
    int fd;
    int want_out;      /* EPOLLOUT registered */
    size_t sent, got;  /* bytes of the current message sent / echoed back */
    uint64_t seq;
    uint64_t t0;       /* ns when the current message started */
    unsigned char *msg;
};

static size_t msg_size = 32;
static uint32_t *hist;
static uint64_t hist_over, lat_max_ns, nrt, nerrors;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "echo_load: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fill_msg(struct conn *c)
{
    /* A different payload every time, so a server echoing stale bytes shows. */
    uint64_t x = c->seq * 0x9E3779B97F4A7C15ull + (uint64_t)c->fd;
    for (size_t i = 0; i < msg_size; i++) {
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
        c->msg[i] = (unsigned char)('!' + (x * 0x2545F4914F6CDD1Dull >> 58));
    }
}

static void set_out(int ep, struct conn *c, int on)
{
    if (c->want_out == on)
        return;
    struct epoll_event ev = { .events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c };
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl");
    c->want_out = on;
}

static void drop(int ep, struct conn *c, int *alive, const char *why)
{
    if (c->fd < 0)
        return;
    if (nerrors < 3)
        fprintf(stderr, "echo_load: connection fd %d: %s\n", c->fd, why);
    else if (nerrors == 3)
        fprintf(stderr, "echo_load: (more connection errors not shown)\n");
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    nerrors++;
    (*alive)--;
}

/* Sends what is left of the current message. */
static void pump_out(int ep, struct conn *c, int *alive)
{
    while (c->sent < msg_size) {
        ssize_t n = send(c->fd, c->msg + c->sent, msg_size - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_out(ep, c, 1);
            return;
        } else {
            drop(ep, c, alive, n < 0 ? strerror(errno) : "send returned 0");
            return;
        }
    }
    set_out(ep, c, 0);
}

static void start_msg(int ep, struct conn *c, int *alive)
{
    c->seq++;
    fill_msg(c);
    c->sent = c->got = 0;
    c->t0 = now_ns();
    pump_out(ep, c, alive);
}

static void on_in(int ep, struct conn *c, int *alive, uint64_t deadline)
{
    unsigned char buf[MAX_SIZE];
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        drop(ep, c, alive, strerror(errno));
        return;
    }
    if (n == 0) {
        drop(ep, c, alive, "closed by the server");
        return;
    }
    if ((size_t)n > c->sent - c->got || memcmp(buf, c->msg + c->got, (size_t)n) != 0) {
        drop(ep, c, alive, "echo does not match what was sent");
        return;
    }
    c->got += (size_t)n;
    if (c->got < msg_size)
        return;
    uint64_t t = now_ns(), lat = t - c->t0;
    uint64_t us = lat / 1000;
    if (us < HIST_US)
        hist[us]++;
    else
        hist_over++;
    if (lat > lat_max_ns)
        lat_max_ns = lat;
    nrt++;
    if (t < deadline)
        start_msg(ep, c, alive);
}

static double percentile(double p)
{
    uint64_t total = nrt, rank = (uint64_t)(p * (double)total + 0.999999), seen = 0;
    if (total == 0)
        return 0;
    if (rank < 1)
        rank = 1;
    for (uint64_t i = 0; i < HIST_US; i++) {
        seen += hist[i];
        if (seen >= rank)
            return (double)i + 0.5; /* middle of the 1 µs bucket */
    }
    return (double)lat_max_ns / 1000.0;
}

static void usage(void)
{
    fprintf(stderr, "usage: echo_load [-H host] [-p port] [-c conns] [-d seconds] [-s size]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *port = NULL;
    long nconns = 100;
    double secs = 5;
    int opt;
    while ((opt = getopt(argc, argv, "H:p:c:d:s:h")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = optarg; break;
        case 'c': nconns = strtol(optarg, NULL, 10); break;
        case 'd': secs = strtod(optarg, NULL); break;
        case 's': msg_size = (size_t)strtoul(optarg, NULL, 10); break;
        default: usage();
        }
    }
    if (!port || nconns < 1 || nconns > 60000 || !(secs > 0 && secs < 3600) ||
        msg_size < 1 || msg_size > MAX_SIZE)
        usage();
    signal(SIGPIPE, SIG_IGN);

    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai != 0) {
        fprintf(stderr, "echo_load: %s:%s: %s\n", host, port, gai_strerror(gai));
        return 1;
    }

    hist = calloc(HIST_US, sizeof *hist);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    unsigned char *msgs = malloc((size_t)nconns * msg_size);
    if (!hist || !conns || !msgs)
        die("malloc");

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");

    /* Connect everything first (blocking; loopback connects complete at once
     * as long as the backlog has room), then start the clock. */
    for (long i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->msg = msgs + (size_t)i * msg_size;
        c->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0)
            die("socket");
        if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0) {
            fprintf(stderr, "echo_load: connect %s:%s (connection %ld): %s\n",
                    host, port, i + 1, strerror(errno));
            return 1;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int fl = fcntl(c->fd, F_GETFL);
        if (fl < 0 || fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) < 0)
            die("fcntl");
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            die("epoll_ctl");
    }
    freeaddrinfo(ai);

    int alive = (int)nconns;
    uint64_t start = now_ns(), deadline = start + (uint64_t)(secs * 1e9);
    for (long i = 0; i < nconns; i++)
        start_msg(ep, &conns[i], &alive);

    struct epoll_event evs[512];
    uint64_t end;
    for (;;) {
        end = now_ns();
        if (end >= deadline || alive == 0)
            break;
        int timeout_ms = (int)((deadline - end) / 1000000u) + 1;
        if (timeout_ms > 100)
            timeout_ms = 100;
        int n = epoll_wait(ep, evs, 512, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->fd >= 0 && (evs[i].events & EPOLLOUT))
                pump_out(ep, c, &alive);
            if (c->fd >= 0 && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                on_in(ep, c, &alive, deadline);
        }
    }

    double elapsed = (double)(end - start) / 1e9;
    /* Our own CPU use: near 100% means the load generator, not the server,
     * may be the limit. (Includes the connect phase, which is short.) */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                 (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    printf("rt=%llu secs=%.3f rt_per_s=%.1f p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f "
           "max_us=%.1f errors=%llu conns=%ld size=%zu client_cpu_pct=%.0f client_cpu_s=%.3f\n",
           (unsigned long long)nrt, elapsed, (double)nrt / elapsed, percentile(0.50),
           percentile(0.90), percentile(0.99), percentile(0.999),
           (double)lat_max_ns / 1000.0, (unsigned long long)nerrors,
           nconns, msg_size, 100.0 * cpu / elapsed, cpu);
    fflush(stdout);
    for (long i = 0; i < nconns; i++)
        if (conns[i].fd >= 0)
            close(conns[i].fd);
    return (nerrors || nrt == 0) ? 1 : 0;
}
