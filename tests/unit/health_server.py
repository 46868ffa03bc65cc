"""A stand-in HTTP server for the harness's own tests: uvicorn (as SGLang serves) answering
``/health``, binding ``--port`` only after ``--bind-delay`` seconds."""

import argparse
import time

import uvicorn


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    status = 200 if scope["path"] == "/health" else 404
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind-delay", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.bind_delay)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
