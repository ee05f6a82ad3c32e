/*
 * baseline_relay: the least a same-host TCP proxy can cost, for
 * `bench.py --baseline`.
 *
 * One process, one thread, one poll() loop over every connection; bytes are
 * copied as they arrive (read, then write until done), TCP_NODELAY on both
 * sides, no parsing, no buffering policy, no allocation. Whatever it adds to
 * a round trip is the machine's price for an extra hop (two more TCP
 * traversals and two more process wake-ups), which no proxy can avoid.
 * Writes block: fine for ZEO's peers, which never stop reading.
 *
 * Usage: baseline_relay LISTEN_PORT UPSTREAM_PORT   (both on 127.0.0.1)
 * Build: cc -O2 -o baseline_relay baseline_relay.c
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_PAIRS 64

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int write_all(int fd, const char *p, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return -1;
        p += w;
        n -= w;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
        return 2;
    }
    struct sockaddr_in listen_addr = loopback(atoi(argv[1]));
    struct sockaddr_in upstream_addr = loopback(atoi(argv[2]));
    int one = 1;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&listen_addr, sizeof listen_addr) ||
        listen(lfd, 64)) {
        perror("baseline_relay: listen");
        return 1;
    }
    /* fds[0] is the listener; then pairs: fds[2k+1] client, fds[2k+2] upstream. */
    struct pollfd fds[1 + 2 * MAX_PAIRS];
    int n = 1;
    fds[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
    static char buf[1 << 16];
    for (;;) {
        if (poll(fds, n, -1) < 0) continue;
        if (fds[0].revents & POLLIN) {
            int c = accept(lfd, NULL, NULL);
            if (c >= 0) {
                int u = socket(AF_INET, SOCK_STREAM, 0);
                if (n + 2 > 1 + 2 * MAX_PAIRS ||
                    connect(u, (struct sockaddr *)&upstream_addr,
                            sizeof upstream_addr)) {
                    close(c);
                    close(u);
                } else {
                    nodelay(c);
                    nodelay(u);
                    fds[n++] = (struct pollfd){.fd = c, .events = POLLIN};
                    fds[n++] = (struct pollfd){.fd = u, .events = POLLIN};
                }
            }
        }
        for (int i = 1; i < n; i++) {
            if (!fds[i].revents) continue;
            int peer = (i % 2) ? i + 1 : i - 1;
            ssize_t got = read(fds[i].fd, buf, sizeof buf);
            if (got > 0 && write_all(fds[peer].fd, buf, got) == 0) continue;
            /* EOF or error on either side: drop the pair (the last pair
             * moves into its slot, so look at slot i again). */
            int first = (i % 2) ? i : i - 1;
            close(fds[first].fd);
            close(fds[first + 1].fd);
            fds[first] = fds[n - 2];
            fds[first + 1] = fds[n - 1];
            fds[first].revents = fds[first + 1].revents = 0;
            n -= 2;
            i = first - 1;
        }
    }
}
