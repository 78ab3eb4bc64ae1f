"""Python `websockets` peers with their default compression (permessage-deflate), for
tests/compression.rs.

Usage: peers.py upstream [PORT]
           Listens on 127.0.0.1 (PORT, or a free port), prints "ready PORT". Echoes messages, except:
           "report" -> JSON {"offer": the Sec-WebSocket-Extensions it was offered,
                             "agreed": what it answered}
           "stream N" -> N text messages of 1 KiB of repetitive JSON, then "end".
       peers.py client URL
           Connects through wskeep, prints one JSON line: the extension the client agreed to,
           what the upstream reports, the JSON pong wskeep sent for a ping, an echo, and the
           number and size of the streamed messages.
"""
import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

ROW = json.dumps({"type": "transcript", "speaker": "agent", "text": "hello " * 150})[:1000].ljust(1024)


async def handler(ws):
    async for message in ws:
        if message == "report":
            await ws.send(json.dumps({
                "offer": ws.request.headers.get("Sec-WebSocket-Extensions"),
                "agreed": ws.response.headers.get("Sec-WebSocket-Extensions"),
            }))
        elif isinstance(message, str) and message.startswith("stream "):
            for _ in range(int(message.split()[1])):
                await ws.send(ROW)
            await ws.send("end")
        else:
            await ws.send(message)


async def upstream(port):
    # No size limit of its own: wskeep's limits.max_message_size is what tests see.
    async with serve(handler, "127.0.0.1", port, max_size=None) as server:
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


async def client(url):
    async with connect(url, max_size=None) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
        await ws.send(json.dumps({"type": "ping", "id": 7}))
        pong = json.loads(await asyncio.wait_for(ws.recv(), 5))
        await ws.send("report")
        report = json.loads(await asyncio.wait_for(ws.recv(), 5))
        await ws.send("héllo " * 50)
        echo = await asyncio.wait_for(ws.recv(), 5)
        await ws.send("stream 100")
        count = size = 0
        while (message := await asyncio.wait_for(ws.recv(), 10)) != "end":
            count += 1
            size += len(message.encode())
        print(json.dumps({
            "client_agreed": agreed,
            "upstream": report,
            "pong": pong,
            "echo_ok": echo == "héllo " * 50,
            "streamed": count,
            "streamed_bytes": size,
        }), flush=True)


if sys.argv[1] == "upstream":
    asyncio.run(upstream(int(sys.argv[2]) if len(sys.argv) > 2 else 0))
else:
    asyncio.run(client(sys.argv[2]))
