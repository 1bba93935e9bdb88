#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that adds network latency, for bench/latency.sh (issue 12).

    latency_proxy.py serve --upstream 127.0.0.1:9000 --delay-ms 10 [--port 0] \
        [--port-file F] [--stats F]
    latency_proxy.py ping --port P [--count 20]

serve: every byte is forwarded DELAY ms after the proxy read it, in both directions (one-way
delay; 10 ms each way is 20 ms of round-trip time). Order is kept and bandwidth is not limited:
pure propagation delay, as netem's `delay` would add (the kernel here has no sch_netem). A new
connection also pays one round trip, as a TCP handshake would: the client's first bytes reach
the server no sooner than accept + RTT + DELAY (connect() to the proxy itself returns at once).

Counts, written to --stats as JSON (rewritten at most every 20 ms when they change):
  connections    accepted connections
  exchanges      client->server bursts that start after the server last spoke on that connection
                 (or at its start): one per HTTP request without pipelining
  requests       {METHOD: n}, exchanges whose first bytes are an HTTP request line
  bytes_up / bytes_down
--trace F appends one line per exchange (time, connection number, request line) to F.

ping: sends HEAD / over one kept-alive connection COUNT times through the proxy and prints the
first (with the handshake) and the median of the others: the RTT the proxy adds, measured.
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time

METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


class Stats:
    def __init__(self, path, trace):
        self.path, self.trace = path, trace
        self.c = dict(connections=0, exchanges=0, requests={}, bytes_up=0, bytes_down=0)
        self.dirty = True

    def exchange(self, conn, first):
        self.c["exchanges"] += 1
        if self.trace:
            line = first.split(b"\r\n", 1)[0][:120].decode("latin-1")
            print("%.3f conn %d: %s" % (time.time(), conn, line), file=self.trace, flush=True)
        for m in METHODS:
            if first.startswith(m):
                k = m.decode().strip()
                self.c["requests"][k] = self.c["requests"].get(k, 0) + 1
        self.dirty = True

    async def writer(self):
        while True:
            if self.dirty and self.path:
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(self.c, f)
                os.replace(tmp, self.path)
                self.dirty = False
            await asyncio.sleep(0.02)


class Conn:
    """One proxied connection: two pumps sharing who spoke last."""

    def __init__(self, stats, delay, n):
        self.stats, self.delay, self.n = stats, delay, n
        self.server_spoke = True  # so that the first client bytes start an exchange
        self.accepted = time.monotonic()

    async def pump(self, reader, writer, up):
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()

        async def release():
            while True:
                at, data = await queue.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        task = asyncio.ensure_future(release())
        handshake_until = loop.time() + 3 * self.delay if up else 0
        try:
            while True:
                data = await reader.read(1 << 16)
                now = loop.time()
                if up and data and self.server_spoke:
                    self.server_spoke = False
                    self.stats.exchange(self.n, data)
                elif not up and data:
                    self.server_spoke = True
                if data:
                    self.stats.c["bytes_up" if up else "bytes_down"] += len(data)
                    self.stats.dirty = True
                at = max(now + self.delay, handshake_until)
                await queue.put((at, data if data else None))
                if not data:
                    break
            await task
        except (ConnectionError, OSError):
            task.cancel()
        finally:
            if not task.done():
                await asyncio.gather(task, return_exceptions=True)


async def serve(args):
    host, port = args.upstream.rsplit(":", 1)
    stats = Stats(args.stats, open(args.trace, "a") if args.trace else None)
    delay = args.delay_ms / 1000.0

    async def handle(cr, cw):
        stats.c["connections"] += 1
        stats.dirty = True
        n = stats.c["connections"]  # before any await: connections accepted together differ
        for w in (cw,):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sr, sw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        sw.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(stats, delay, n)
        try:
            await asyncio.gather(c.pump(cr, sw, True), c.pump(sr, cw, False))
        finally:
            for w in (cw, sw):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    bound = server.sockets[0].getsockname()[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write("%d\n" % bound)
        os.replace(args.port_file + ".tmp", args.port_file)
    print("listening on 127.0.0.1:%d, upstream %s, one-way delay %.1f ms"
          % (bound, args.upstream, args.delay_ms), flush=True)
    asyncio.ensure_future(stats.writer())
    async with server:
        await server.serve_forever()


def ping(args):
    def once(s):
        t = time.perf_counter()
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("connection closed by the server")
            buf += chunk
        return (time.perf_counter() - t) * 1e3

    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", args.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first = (time.perf_counter() - t0) * 1e3 + once(s)
    rest = [once(s) for _ in range(args.count)]
    print("first request (with handshake) %.1f ms; then median %.1f ms (min %.1f, max %.1f) over %d"
          % (first, statistics.median(rest), min(rest), max(rest), len(rest)))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--upstream", required=True)
    s.add_argument("--delay-ms", type=float, default=10.0)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--port-file")
    s.add_argument("--stats")
    s.add_argument("--trace", help="append one line per exchange: time, connection, request line")
    g = sub.add_parser("ping")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--count", type=int, default=20)
    args = p.parse_args()
    if args.cmd == "serve":
        try:
            asyncio.run(serve(args))
        except KeyboardInterrupt:
            pass
    else:
        ping(args)


if __name__ == "__main__":
    sys.exit(main())
