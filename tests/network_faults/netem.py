#!/usr/bin/env python3
"""A stand-in for `tc qdisc ... netem delay D loss P`, for kernels built without sch_netem.

It holds every packet that iptables sends to NFQUEUE queue `--queue` for `--delay` seconds
(the packet stays in the kernel's queue meanwhile; only its verdict comes from here) and
drops a fraction `--loss` of them, chosen by a random generator seeded with `--seed`. Real
kernel packets, so TCP sees a real round-trip time and retransmits what was lost.

Talks nfnetlink_queue (linux/netfilter/nfnetlink_queue.h) over a raw netlink socket, with
nothing but the standard library. Prints "ready" once bound; runs until stdin closes.
Run it inside the network namespace whose iptables rules queue the packets.
"""

import argparse
import heapq
import os
import random
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NF_DROP = 0
NF_ACCEPT = 1


def attr(kind, payload):
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def message(kind, queue, attrs, flags=NLM_F_REQUEST, seq=0):
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body


def messages(data):
    """(type, payload) of each netlink message in one datagram."""
    while len(data) >= 16:
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data)
        if length < 16:
            return
        yield kind, data[16:length]
        data = data[(length + 3) & ~3 :]


def attributes(data):
    while len(data) >= 4:
        length, kind = struct.unpack_from("=HH", data)
        if length < 4:
            return
        yield kind & 0x7FFF, data[4:length]
        data = data[(length + 3) & ~3 :]


def configure(sock, queue):
    """Binds the queue and asks for packet metadata only; raises if the kernel refuses."""
    cmd = attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC))
    params = attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META) + b"\0" * 3)
    for seq, attrs in ((1, [cmd]), (2, [params])):
        sock.send(message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
        for kind, payload in messages(sock.recv(65536)):
            if kind == NLMSG_ERROR:
                (errno,) = struct.unpack_from("=i", payload)
                if errno != 0:
                    raise OSError(-errno, "nfnetlink_queue config refused: " + os.strerror(-errno))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay", type=float, required=True, help="seconds each packet is held")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, 0))
    configure(sock, args.queue)
    print("ready", flush=True)

    held = []  # (release time, packet id, verdict), earliest first
    passed = dropped = 0
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        readable, _, _ = select.select([sock, sys.stdin], [], [], timeout)
        if sys.stdin in readable and not sys.stdin.buffer.read1(4096):
            break
        if sock in readable:
            for kind, payload in messages(sock.recv(65536)):
                if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    continue
                for akind, value in attributes(payload[4:]):
                    if akind == NFQA_PACKET_HDR:
                        (packet_id,) = struct.unpack_from("!I", value)
                        verdict = NF_DROP if rng.random() < args.loss else NF_ACCEPT
                        heapq.heappush(held, (time.monotonic() + args.delay, packet_id, verdict))
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, packet_id, verdict = heapq.heappop(held)
            passed += verdict == NF_ACCEPT
            dropped += verdict == NF_DROP
            hdr = attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
            sock.send(message(NFQNL_MSG_VERDICT, args.queue, [hdr]))
    print(f"passed {passed} dropped {dropped}", flush=True)


if __name__ == "__main__":
    main()
