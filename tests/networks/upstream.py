"""A WebSocket and HTTP upstream (Python `websockets`) for tests/networks.rs.

Usage: upstream.py unix SOCKET_PATH
       upstream.py tls CERT KEY [CLIENT_CA]     (127.0.0.1, a free port; CLIENT_CA: mTLS required)
WebSocket: echoes text; "whoami" is answered with the Host and X-Forwarded-For it was sent and,
over TLS, whether the TLS session was resumed. Plain HTTP: GET /plain answers 200 the same.
Prints "ready PORT" (PORT 0 for a Unix socket) once it listens.
"""
import asyncio
import http
import ssl
import sys

from websockets.asyncio.server import serve, unix_serve


def described(request, transport):
    host = request.headers.get("Host", "")
    xff = request.headers.get("X-Forwarded-For", "")
    text = f"host={host} xff={xff}"
    tls = transport.get_extra_info("ssl_object") if transport else None
    if tls is not None:
        text += f" resumed={tls.session_reused}"
    return text


async def echo(ws):
    async for message in ws:
        await ws.send(described(ws.request, ws.transport) if message == "whoami" else message)


def process_request(connection, request):
    if request.path.startswith("/plain"):
        return connection.respond(http.HTTPStatus.OK, "plain " + described(request, connection.transport) + "\n")
    return None


async def main():
    if sys.argv[1] == "unix":
        async with unix_serve(echo, sys.argv[2], process_request=process_request):
            print("ready 0", flush=True)
            await asyncio.Future()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    if len(sys.argv) > 4:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(sys.argv[4])
    async with serve(echo, "127.0.0.1", 0, ssl=context, process_request=process_request) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"ready {port}", flush=True)
        await asyncio.Future()


asyncio.run(main())
