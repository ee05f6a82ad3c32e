"""A trivial TCP forwarder, used only by ``bench.py --self-test``.

It stands in for zrelay so the proxied code path of the benchmark can be
exercised without a working zrelay build: one thread per direction per
connection, bytes copied as they arrive, TCP_NODELAY on both sides. Loopback
only. It is a test double, not a baseline: being Python, it is much slower
than a real proxy.

Usage: forwarder.py LISTEN_PORT UPSTREAM_PORT   (both on 127.0.0.1)
Stops on SIGTERM or SIGINT.
"""
import signal
import socket
import sys
import threading

HOST = '127.0.0.1'


def pipe(src, dst, first_done):
    """Copy src -> dst until EOF; the second direction to end closes both."""
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)     # wakes the other direction
        except OSError:
            pass
    if not first_done.acquire(blocking=False):
        src.close()
        dst.close()


def serve(listen_port, upstream_port):
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, listen_port))
    lsock.listen(128)
    while True:
        client, _ = lsock.accept()
        try:
            upstream = socket.create_connection((HOST, upstream_port),
                                                timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        done = threading.Lock()
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b, done),
                             daemon=True).start()


def main():
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(listen_port, upstream_port)
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    main()
