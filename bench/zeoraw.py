"""A minimal ZEO 5 client on a plain blocking socket, for latency benchmarks.

It speaks just enough of the protocol to time single round trips without any
ZODB or ZEO client code in the way (no client cache, no asyncio thread):

* framing: a 4-byte big-endian length, then the payload;
* handshake: the server sends its protocol (``Z5`` pickle, ``M5`` msgpack)
  as the first frame; the client answers with the protocol it will use;
* every later message is ``(msgid, async_flag, name, args)``; a reply is
  ``(msgid, 0, '.reply', result)`` and an error reply has flag 2;
* pickle messages are protocol 3 without a memo (``Pickler.fast``), as ZEO
  itself sends them; msgpack uses ``use_bin_type=True``.

``timed_call`` encodes the request before it starts the clock and decodes the
reply after it stops, so the measured interval is send + wait + receive only.
"""
import io
import pickle
import socket
import struct
import time

MAXTID = b'\x7f\xff\xff\xff\xff\xff\xff\xff'
Z64 = b'\x00' * 8

_HDR = struct.Struct('>I')


class ProtocolError(Exception):
    pass


class ServerError(Exception):
    """An error reply (flag 2): ``(class_name, args_or_dict)``."""


class _NoGlobals(pickle.Unpickler):
    """Server-to-client messages never need a global; refuse them."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'unexpected global {module}.{name}')


def _pickle_encode(obj):
    f = io.BytesIO()
    p = pickle.Pickler(f, 3)
    p.fast = True
    p.dump(obj)
    return f.getvalue()


def _pickle_decode(payload):
    return _NoGlobals(io.BytesIO(payload)).load()


def codec(encoding):
    """Return ``(encode, decode)`` for ``'Z'`` (pickle) or ``'M'`` (msgpack)."""
    if encoding == 'Z':
        return _pickle_encode, _pickle_decode
    if encoding == 'M':
        import msgpack

        def encode(obj):
            return msgpack.packb(obj, use_bin_type=True)

        def decode(payload):
            return msgpack.unpackb(payload, raw=False, use_list=False)
        return encode, decode
    raise ValueError(f'unknown ZEO encoding {encoding!r}')


class RawZeo:
    """One connection to a ZEO server (or to a proxy in front of one)."""

    def __init__(self, host, port, timeout=10.0, encoding=None):
        """Connect and do the handshake.

        *encoding* ``None`` answers with the server's own offer, as
        ClientStorage does; ``'Z'`` or ``'M'`` forces one.
        """
        if isinstance(port, str):       # a unix socket path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(port)
        else:
            self.sock = socket.create_connection((host, port),
                                                 timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._msgid = 0
        offer = self._recv_frame()
        if offer[:1] not in (b'Z', b'M') or len(offer) < 2:
            raise ProtocolError(f'unexpected handshake {bytes(offer)!r}')
        self.encoding = encoding or offer[:1].decode()
        self.protocol = self.encoding.encode() + bytes(offer[1:])
        self._encode, self._decode = codec(self.encoding)
        self._send_frame(self.protocol)
        self.last_tid = None

    # -- framing ------------------------------------------------------------
    def _send_frame(self, payload):
        self.sock.sendall(_HDR.pack(len(payload)) + payload)

    def _recv_frame(self):
        buf = self._buf
        while True:
            if len(buf) >= 4:
                (n,) = _HDR.unpack_from(buf)
                if len(buf) >= 4 + n:
                    payload = bytes(buf[4:4 + n])
                    del buf[:4 + n]
                    return payload
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError('server closed the connection')
            buf += chunk

    # -- messages -----------------------------------------------------------
    def request(self, name, *args):
        """Encode a sync call; return ``(msgid, framed_bytes)``."""
        self._msgid += 1
        payload = self._encode((self._msgid, False, name, args))
        return self._msgid, _HDR.pack(len(payload)) + payload

    def _reply(self, msgid, payload):
        """Decode *payload*; the result if it is our reply, else ``_OTHER``."""
        msg = self._decode(payload)
        if len(msg) != 4:
            raise ProtocolError(f'malformed message {msg!r:.200}')
        if msg[2] != '.reply':
            return _OTHER          # async server->client call (info, ...)
        if msg[0] != msgid:
            raise ProtocolError(f'reply to {msg[0]!r}, expected {msgid!r}')
        if msg[1]:
            raise ServerError(*msg[3]) if isinstance(msg[3], (tuple, list)) \
                else ServerError(msg[3])
        return msg[3]

    def call(self, name, *args):
        msgid, frame = self.request(name, *args)
        self.sock.sendall(frame)
        while True:
            result = self._reply(msgid, self._recv_frame())
            if result is not _OTHER:
                return result

    def timed_call(self, msgid, frame):
        """Send a pre-encoded request, wait for its reply.

        Returns ``(elapsed_ns, result)``; the clock covers only the socket
        round trip, not encoding or decoding.
        """
        sock, recv_frame, clock = self.sock, self._recv_frame, time.perf_counter_ns
        t0 = clock()
        sock.sendall(frame)
        payload = recv_frame()
        t1 = clock()
        result = self._reply(msgid, payload)
        while result is _OTHER:         # an async message came first
            payload = recv_frame()
            t1 = clock()
            result = self._reply(msgid, payload)
        return t1 - t0, result

    def register(self, storage='1', read_only=False):
        self.last_tid = self.call('register', storage, read_only)
        return self.last_tid

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_OTHER = object()


def connect(host, port, storage='1', timeout=10.0, encoding=None):
    """Connect, handshake and register; return the ``RawZeo``."""
    c = RawZeo(host, port, timeout=timeout, encoding=encoding)
    try:
        c.register(storage)
    except BaseException:
        c.close()
        raise
    return c
