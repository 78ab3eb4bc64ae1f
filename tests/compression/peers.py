"""Python `websockets` peers with their default compression (permessage-deflate), for
tests/compression.rs.

Usage: peers.py upstream [PORT]
           Listens on 127.0.0.1 (PORT, or a free port), prints "ready PORT". Echoes messages, except:
           "report" -> JSON {"offer": the Sec-WebSocket-Extensions it was offered,
                             "agreed": what it answered}
           "stream N" -> N text messages of 1 KiB of repetitive JSON, then "end";
           "count N" -> N numbered text messages ("1 ...", "2 ...", each with the same 200 bytes
           of JSON, which a compressor with context takeover encodes by reference to the one
           before), then "end";
           "result ..." -> printed on a line of its own (a browser page's report).
           The report also says how many connections the upstream has had and how many messages
           starting with wskeep's reserved prefix reached it.
           Plain HTTP: GET /page answers the browser page (tests/browser.rs), which opens a
           WebSocket to /ws on the origin it was loaded from.
       peers.py resume-client URL
           Opens a resumable session (docs/resume.md) through wskeep, asks for "count 50", drops
           its TCP connection (no close frame) after 5 messages and an ack, resumes, and prints
           one JSON line: the numbers it received, in order, and the upstream's report.
       peers.py client URL
           Connects through wskeep, prints one JSON line: the extension the client agreed to,
           what the upstream reports, the JSON pong wskeep sent for a ping, an echo, and the
           number and size of the streamed messages.
"""
import asyncio
import http
import json
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

# Sends a JSON ping, asks for the report, takes a stream and sends back what it saw.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>wskeep compression</title></head><body><script>
"use strict";
const r = { extensions: null, protocol_pong: null, report: null, streamed: 0, streamed_bytes: 0 };
let stage = 0;
const ws = new WebSocket("wss://" + location.host + "/ws");
ws.onopen = () => { r.extensions = ws.extensions; ws.send(JSON.stringify({ type: "ping", id: 9 })); };
ws.onmessage = (e) => {
  if (stage === 0) { r.protocol_pong = JSON.parse(e.data); stage = 1; ws.send("report"); }
  else if (stage === 1) { r.report = JSON.parse(e.data); stage = 2; ws.send("stream 100"); }
  else if (e.data !== "end") { r.streamed += 1; r.streamed_bytes += e.data.length; }
  else { ws.send("result " + JSON.stringify(r)); }
};
</script></body></html>
"""

ROW = json.dumps({"type": "transcript", "speaker": "agent", "text": "hello " * 150})[:1000].ljust(1024)


SEEN = {"connections": 0, "control_seen": 0}


async def handler(ws):
    SEEN["connections"] += 1
    async for message in ws:
        if isinstance(message, str) and message.startswith("\0wskeep:"):
            SEEN["control_seen"] += 1
        if message == "report":
            await ws.send(json.dumps({
                "offer": ws.request.headers.get("Sec-WebSocket-Extensions"),
                "agreed": ws.response.headers.get("Sec-WebSocket-Extensions"),
                **SEEN,
            }))
        elif isinstance(message, str) and message.startswith("count "):
            for i in range(1, int(message.split()[1]) + 1):
                await ws.send(f"{i} {ROW[:200]}")
            await ws.send("end")
        elif isinstance(message, str) and message.startswith("stream "):
            for _ in range(int(message.split()[1])):
                await ws.send(ROW)
            await ws.send("end")
        elif isinstance(message, str) and message.startswith("result "):
            print(message, flush=True)
        else:
            await ws.send(message)


def process_request(connection, request):
    if request.path == "/page":
        response = connection.respond(http.HTTPStatus.OK, PAGE)
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        return response
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
    return None


async def upstream(port):
    # No size limit of its own: wskeep's limits.max_message_size is what tests see.
    async with serve(handler, "127.0.0.1", port, max_size=None, process_request=process_request) as server:
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


async def data(ws):
    """The next message that is not one of wskeep's control messages."""
    while (message := await asyncio.wait_for(ws.recv(), 5)).startswith("\0wskeep:"):
        pass
    return message


async def resume_client(url):
    ws = await connect(url + "?wskeep_resume=1", max_size=None)
    session = await asyncio.wait_for(ws.recv(), 5)
    assert session.startswith("\0wskeep:session "), session
    token = session.split()[1]
    await ws.send("count 50")
    got = [await data(ws) for _ in range(5)]
    # The ack travels compressed, as every message of this client does.
    await ws.send(f"\0wskeep:ack {len(got)}")
    ws.transport.abort()
    resumed = await connect(
        f"{url}?wskeep_resume=1&wskeep_token={token}&wskeep_received={len(got)}", max_size=None)
    session = await asyncio.wait_for(resumed.recv(), 5)
    assert session.startswith("\0wskeep:session "), session
    while (message := await data(resumed)) != "end":
        got.append(message)
    await resumed.send("report")
    report = json.loads(await data(resumed))
    await resumed.close()
    print(json.dumps({
        "numbers": [int(m.split()[0]) for m in got],
        "extensions": resumed.response.headers.get("Sec-WebSocket-Extensions"),
        "upstream": report,
    }), flush=True)


if sys.argv[1] == "upstream":
    asyncio.run(upstream(int(sys.argv[2]) if len(sys.argv) > 2 else 0))
elif sys.argv[1] == "resume-client":
    asyncio.run(resume_client(sys.argv[2]))
else:
    asyncio.run(client(sys.argv[2]))
