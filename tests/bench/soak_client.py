#!/usr/bin/env python3
"""Active connections for tests/bench/soak.sh (standard library only).

Opens CONNS WebSocket connections and, for DURATION seconds, sends a 64-byte text message on each
at an aggregate RATE, checks that every message comes back unchanged, and answers protocol pings
with pongs at any time (`wskeep bench latency` does not: it ends a connection on the first ping, so
it cannot run with client pings on). Any close or end of stream before DURATION is a lost
connection. At the end each connection sends close 1000 and waits for the answer.
Prints a human line and a final JSON line.

    soak_client.py URL --conns 300 --rate 300 --duration 600 [--insecure]
"""
import argparse
import asyncio
import base64
import json
import os
import ssl
import struct
import sys
import time
import urllib.parse

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode, payload=b""):
    """A masked, final client frame."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_frame(reader):
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    if b1 & 0x80:
        raise ValueError("masked frame from the server")
    return b0 & 0x0F, bool(b0 & 0x80), await reader.readexactly(n)


class Stats:
    def __init__(self):
        self.sent = self.echoed = self.pings = self.lost = self.failed = self.mismatched = 0
        self.rtts = []
        self.closes = {}


async def connect(url, insecure):
    u = urllib.parse.urlsplit(url)
    tls = u.scheme == "wss"
    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    port = u.port or (443 if tls else 80)
    reader, writer = await asyncio.open_connection(u.hostname, port, ssl=ctx)
    key = base64.b64encode(os.urandom(16)).decode()
    path = (u.path or "/") + ("?" + u.query if u.query else "")
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    return reader, writer


async def run_conn(i, url, args, stats, start, stop):
    try:
        reader, writer = await asyncio.wait_for(connect(url, args.insecure), 10)
    except Exception:
        stats.failed += 1
        return
    period = args.conns / args.rate
    outstanding = {}  # payload -> send time
    done = asyncio.Event()
    ended = {"by_us": False}

    async def receive():
        while True:
            try:
                op, fin, payload = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, OSError):
                if not ended["by_us"]:
                    stats.lost += 1
                    stats.closes["eof"] = stats.closes.get("eof", 0) + 1
                return
            if op == OP_PING:
                stats.pings += 1
                try:
                    writer.write(frame(OP_PONG, payload))
                except Exception:
                    pass
            elif op in (OP_TEXT, OP_BINARY):
                sent = outstanding.pop(payload, None)
                if sent is None:
                    stats.mismatched += 1
                else:
                    stats.echoed += 1
                    stats.rtts.append(time.monotonic() - sent)
            elif op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                if not ended["by_us"]:
                    stats.lost += 1
                    stats.closes[str(code)] = stats.closes.get(str(code), 0) + 1
                    try:
                        writer.write(frame(OP_CLOSE, payload[:2]))
                    except Exception:
                        pass
                done.set()
                return

    receiver = asyncio.create_task(receive())
    # Spread the connections' send times evenly over one period.
    next_send = start + period * i / args.conns
    seq = 0
    while not receiver.done():
        now = time.monotonic()
        if now >= stop:
            break
        if next_send > now:
            await asyncio.wait([receiver], timeout=min(next_send, stop) - now)
            continue
        payload = f"{i:06d}-{seq:012d}-".encode().ljust(64, b"x")
        seq += 1
        outstanding[payload] = time.monotonic()
        try:
            writer.write(frame(OP_TEXT, payload))
            await writer.drain()
            stats.sent += 1
        except Exception:
            break
        next_send += period
    if not receiver.done():
        # Let the last echoes arrive, then close 1000 and wait for the answer.
        await asyncio.sleep(0.5)
        ended["by_us"] = True
        try:
            writer.write(frame(OP_CLOSE, struct.pack("!H", 1000) + b"soak done"))
            await writer.drain()
            await asyncio.wait_for(receiver, 5)
        except Exception:
            receiver.cancel()
    try:
        writer.close()
    except Exception:
        pass


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--conns", type=int, default=300)
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--insecure", action="store_true")
    args = p.parse_args()
    stats = Stats()
    start = time.monotonic() + 1.0
    stop = start + args.duration
    await asyncio.gather(*(run_conn(i, args.url, args, stats, start, stop) for i in range(args.conns)))
    r = sorted(stats.rtts)
    pct = lambda q: round(r[min(int(len(r) * q), len(r) - 1)] * 1e6) if r else 0
    print(
        f"soak client: {args.conns} connections, {stats.sent} sent, {stats.echoed} echoed, {stats.pings} pings answered, "
        f"{stats.lost} lost {stats.closes}, {stats.failed} failed to open; p50 {pct(0.5)}us p99 {pct(0.99)}us"
    )
    print(json.dumps({
        "conns": args.conns, "sent": stats.sent, "echoed": stats.echoed, "missing": stats.sent - stats.echoed,
        "mismatched": stats.mismatched, "pings_answered": stats.pings, "lost": stats.lost, "lost_by": stats.closes,
        "failed": stats.failed, "p50_us": pct(0.5), "p99_us": pct(0.99), "max_us": pct(1.0),
    }))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
