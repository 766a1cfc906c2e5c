"""An aiohttp proxy of the kind the InfiniLM-SVC router is: aiohttp on both sides.

It is a fair, stronger version of that router: one shared client session (a
connection pool) instead of a session per request, streaming bodies through
chunk by chunk. Round-robin over the backends given.

    python -m bench.peers.aiohttp_proxy --port 9000 --backend http://127.0.0.1:8100
"""

from __future__ import annotations

import argparse
import itertools

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-authenticate",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--backend", action="append", required=True)
    args = parser.parse_args()
    backends = itertools.cycle(args.backend)

    async def start(app: web.Application) -> None:
        app["session"] = ClientSession(
            connector=TCPConnector(limit=0, limit_per_host=0),
            timeout=ClientTimeout(total=300),
            auto_decompress=False,
        )

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = next(backends) + request.path_qs
        async with request.app["session"].request(
            request.method, url, data=body, headers=headers
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", proxy)
    print(f"aiohttp proxy listening on http://127.0.0.1:{args.port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
