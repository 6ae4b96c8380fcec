"""The chat page at `/`: static files shipped in the package (serve/webui/), no build step.

`index.html`, `app.js` and `style.css` are served as they are; the page talks to the server's
own API (`/v1/models`, `/v1/chat/completions`). A strict Content-Security-Policy (same origin
only, no inline script) backs the page's own rule of never inserting model text as HTML.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

STATIC = Path(__file__).with_name("webui")
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _file(name: str):
    async def serve(request: Request) -> Response:
        return FileResponse(STATIC / name, media_type=FILES[name],
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff"})

    return serve


def routes() -> list[BaseRoute]:
    """`GET /` (the page) and `GET /webui/{file}` (its script and style)."""
    return [Route("/", _file("index.html"), methods=["GET"]),
            *(Route(f"/webui/{name}", _file(name), methods=["GET"]) for name in FILES)]
