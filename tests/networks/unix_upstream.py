"""A WebSocket and HTTP server on a Unix socket (Python `websockets`), for tests/networks.rs.

Usage: unix_upstream.py SOCKET_PATH [CERT KEY [CLIENT_CA]]
WebSocket: echoes text; "whoami" is answered with the Host and X-Forwarded-For it was sent.
Plain HTTP: GET /plain answers 200 "plain host=HOST".
Prints "ready" once it listens.
"""
import asyncio
import http
import sys

from websockets.asyncio.server import unix_serve


def described(request):
    host = request.headers.get("Host", "")
    xff = request.headers.get("X-Forwarded-For", "")
    return f"host={host} xff={xff}"


async def echo(ws):
    async for message in ws:
        await ws.send(described(ws.request) if message == "whoami" else message)


def process_request(connection, request):
    if request.path.startswith("/plain"):
        return connection.respond(http.HTTPStatus.OK, "plain " + described(request) + "\n")
    return None


async def main():
    async with unix_serve(echo, sys.argv[1], process_request=process_request):
        print("ready", flush=True)
        await asyncio.Future()


asyncio.run(main())
