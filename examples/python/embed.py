#!/usr/bin/env python3
"""Embed one text with an embedfleet fleet from Python, over plain NATS request/reply.

    pip install -r requirements.txt        # nats-py
    embedfleet serve                       # prints the NATS URL it listens on
    python3 embed.py nats://127.0.0.1:PORT

The URL comes from the first argument, else $NATS_URL, else nats://127.0.0.1:4222. The request
is the embed.v1 JSON of docs/protocol.md; any NATS client in any language can send it the same
way. Exits 1 with a one-line message when the fleet cannot answer.
"""

import asyncio
import json
import os
import sys

import nats
from nats.errors import NoRespondersError, NoServersError, TimeoutError

EMBED_ENDPOINT = "embed.v1"
# Slightly over the coordinator's own 30 s request timeout, so a slow fleet answers with its
# typed `timeout` error first.
TIMEOUT_S = 35.0


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


async def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NATS_URL", "nats://127.0.0.1:4222")

    # 1. Connect. nats-py retries a refused server (60 times, 2 s apart, by default); one retry
    #    is enough here, so a wrong URL fails in about a second. Note that 0 retries means
    #    "retry forever" in nats-py.
    async def quiet(_error: Exception) -> None:
        pass  # the failure is reported once, below

    try:
        nc = await nats.connect(
            url,
            connect_timeout=5,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.5,
            allow_reconnect=False,
            error_cb=quiet,
        )
    except (NoServersError, OSError) as error:
        fail(f"cannot connect to NATS at {url} ({error or type(error).__name__})")

    try:
        # 2. Send the request. The Content-Type header picks the encoding (JSON here; the reply
        #    comes back in the same one). Every option besides `input` takes its default: the
        #    fleet's models, fused, normalised, truncated.
        request = {"input": "hello"}
        try:
            reply = await nc.request(
                EMBED_ENDPOINT,
                json.dumps(request).encode(),
                timeout=TIMEOUT_S,
                headers={"Content-Type": "application/json"},
            )
        except NoRespondersError:
            fail(f"no embedfleet service answers on {url}: start one with `embedfleet serve`")
        except TimeoutError:
            fail(f"no reply on {EMBED_ENDPOINT} within {TIMEOUT_S:.0f}s")

        # 3. Errors carry the NATS micro service headers, and an {"error": {...}} body.
        headers = reply.headers or {}
        if "Nats-Service-Error-Code" in headers:
            code = headers["Nats-Service-Error-Code"]
            try:
                detail = json.loads(reply.data)["error"]
                fail(f"the fleet refused the request ({code} {detail['kind']}): {detail['message']}")
            except (ValueError, KeyError, TypeError):
                fail(f"the fleet refused the request ({code}): {headers.get('Nats-Service-Error', '')}")

        # 4. The reply: one `data` element per input, with the fused vector in `embedding`.
        body = json.loads(reply.data)
        first = body["data"][0]
        vector = first["embedding"]
        head = ", ".join(f"{x:+.4f}" for x in vector[:5])
        print(f"model: {body['model']}")
        print(f"dimension: {len(vector)}")
        print(f"first values: [{head}, ...]")
        print(f"cached: {first.get('cached', False)}, tokens: {body['usage']['prompt_tokens']}")
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
