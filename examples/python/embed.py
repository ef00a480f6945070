#!/usr/bin/env python3
"""Embed one text with an embedfleet fleet from Python, over plain NATS request/reply.

    pip install -r requirements.txt        # nats-py
    embedfleet serve                       # prints the NATS URL it listens on
    python3 embed.py nats://127.0.0.1:PORT
    python3 embed.py nats://127.0.0.1:PORT --image cat.png    # an image too (needs clip-vit-l)
    python3 embed.py nats://127.0.0.1:PORT --audio hello.wav  # a sound too (needs whisper-large)

The request carries a W3C `traceparent` header, so the fleet's spans (docs/operations.md#traces)
join this client's trace: the trace id is printed, to find the trace in the tracing backend
(export is on where the fleet's roles have OTEL_EXPORTER_OTLP_ENDPOINT set). An application with
its own OpenTelemetry SDK would send its current span's context instead, with the SDK's
propagator; here the ids are made with `secrets`, which needs no extra dependency.

The URL comes from the first argument, else $NATS_URL, else nats://127.0.0.1:4222. With
`--image FILE` the request carries the image (base64, `image_b64`) before the text and names
clip-vit-l; with `--audio FILE` it carries the sound (base64, `audio_b64`) after the text and
names whisper-large; minilm is always named, so the fleet must serve each model named
(`embedfleet serve --models clip-vit-l,minilm,whisper-large`). An image's vector comes from CLIP
alone, a sound's from Whisper alone, the text's from every text model named. The request is the
embed.v1 JSON of docs/protocol.md; any NATS client in any language can send it the same way.
Exits 1 with a one-line message when the fleet cannot answer.
"""

import asyncio
import base64
import json
import os
import secrets
import sys

import nats
from nats.errors import NoRespondersError, NoServersError, TimeoutError

EMBED_ENDPOINT = "embed.v1"
# Slightly over the coordinator's own 30 s request timeout, so a slow fleet answers with its
# typed `timeout` error first.
TIMEOUT_S = 35.0


def new_traceparent() -> tuple[str, str]:
    """A W3C Trace Context `traceparent` for a new, sampled trace: version 00, a random 16-byte
    trace id and 8-byte parent span id (neither all zeros, which the format forbids), flags 01.
    Returns (header value, trace id)."""
    trace_id = "0" * 32
    while trace_id == "0" * 32:
        trace_id = secrets.token_hex(16)
    span_id = "0" * 16
    while span_id == "0" * 16:
        span_id = secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def take_file_flag(args: list, flag: str):
    """Removes `flag FILE` from args and returns FILE (None when the flag is absent)."""
    if flag not in args:
        return None
    at = args.index(flag)
    if at + 1 >= len(args):
        fail(f"{flag} needs a file")
    path = args[at + 1]
    del args[at : at + 2]
    return path


def read_base64(path: str) -> str:
    try:
        with open(path, "rb") as file:
            return base64.b64encode(file.read()).decode()
    except OSError as error:
        fail(f"cannot read {path}: {error}")


async def main() -> None:
    args = sys.argv[1:]
    image = take_file_flag(args, "--image")
    audio = take_file_flag(args, "--audio")
    url = args[0] if args else os.environ.get("NATS_URL", "nats://127.0.0.1:4222")

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
        if image is not None or audio is not None:
            # Media travel as standard base64 of the file's bytes in `inputs` items; an image's
            # `format` is only a hint (the server sniffs the bytes), and a sound's sample rate
            # comes from its own header. Media reach only the models that take them.
            inputs, models = [{"text": "hello"}], ["minilm"]
            if image is not None:
                format_hint = os.path.splitext(image)[1].lstrip(".").lower() or None
                inputs.insert(0, {"image_b64": read_base64(image), "format": format_hint})
                models.insert(0, "clip-vit-l")
            if audio is not None:
                inputs.append({"audio_b64": read_base64(audio)})
                models.append("whisper-large")
            request = {"inputs": inputs, "models": models}
        traceparent, trace_id = new_traceparent()
        try:
            reply = await nc.request(
                EMBED_ENDPOINT,
                json.dumps(request).encode(),
                timeout=TIMEOUT_S,
                headers={"Content-Type": "application/json", "traceparent": traceparent},
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
        print(f"model: {body['model']}")
        for element in body["data"]:
            vector = element["embedding"]
            head = ", ".join(f"{x:+.4f}" for x in vector[:5])
            print(f"input {element['index']}: dimension {len(vector)}, first values: [{head}, ...]")
        first = body["data"][0]
        print(f"cached: {first.get('cached', False)}, tokens: {body['usage']['prompt_tokens']}")
        print(f"trace id: {trace_id}")
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
