"""A minimal OpenAI chat endpoint on uvicorn, the HTTP server vLLM runs, with a given keep-alive.

    <vLLM venv python> uvicorn_replica.py KEEPALIVE_S

Prints ``READY <port>`` once serving on loopback. It answers every POST with the same chat
completion at once, so a test can make requests meet uvicorn's idle-connection close.
"""

from __future__ import annotations

import json
import socket
import sys

import uvicorn

BODY = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "keepalive",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # connections made before uvicorn runs wait in the backlog
    print(f"READY {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, timeout_keep_alive=float(sys.argv[1]), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
