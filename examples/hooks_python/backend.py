#!/usr/bin/env python3
"""A chat backend for Dormouse, in standard-library Python: no Rust, no SDK.

Dormouse holds the WebSockets (GET /v1/hooks/chat/ws?name=alice); this backend decides
who may connect, hears every message and every disconnect through signed hook calls, and
reaches clients through Dormouse's connection API. See docs/HOOKS.md.

    python3 backend.py --port 9000 --dormouse http://127.0.0.1:8080 \
        --key BACKEND_API_KEY --secret HOOK_SECRET
"""

import argparse
import hashlib
import hmac
import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Chat:
    """Who is connected, by connection id; the disconnects already handled."""

    def __init__(self, dormouse, key):
        self.dormouse = dormouse.rstrip("/")
        self.key = key
        self.lock = threading.Lock()
        self.names = {}  # connection id -> name
        self.seen = set()  # idempotency keys of handled disconnects

    def send(self, connection_id, text):
        """POST /v1/connections/{id}/messages: the client gets `text` as a frame."""
        request = urllib.request.Request(
            f"{self.dormouse}/v1/connections/{urllib.parse.quote(connection_id)}/messages",
            data=text.encode(),
            headers={"Authorization": f"Bearer {self.key}"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=5).read()
            return True
        except urllib.error.HTTPError:
            # 404: that client left meanwhile; its disconnect is on its way.
            return False

    def others(self, connection_id):
        with self.lock:
            return [c for c in self.names if c != connection_id]

    def connect(self, call):
        query = urllib.parse.parse_qs(call.get("query") or "")
        name = (query.get("name") or [""])[0]
        if not name:
            return {"allow": False, "reason": "say who you are: ?name=..."}
        with self.lock:
            if name in self.names.values():
                return {"allow": False, "reason": f"{name} is already here"}
            self.names[call["connection_id"]] = name
        return {"subject": name, "attachment": {"name": name}}

    def message(self, call):
        name = call["attachment"]["name"]
        text = call.get("data", "")
        if text == "/who":
            with self.lock:
                return {"reply": ", ".join(sorted(self.names.values()))}
        sent = sum(self.send(c, f"{name}: {text}") for c in self.others(call["connection_id"]))
        return {"reply": f"sent to {sent}"}

    def disconnect(self, call, idempotency_key):
        with self.lock:
            if idempotency_key in self.seen:
                return {}
            self.seen.add(idempotency_key)
            name = self.names.pop(call["connection_id"], None)
        if name is not None:
            for c in self.others(call["connection_id"]):
                self.send(c, f"{name} left")
        return {}


def verified(secret, headers, body):
    """The Dormouse-Signature check: HMAC-SHA256 of `{t}.{body}`, and a fresh `t`."""
    signature = headers.get("Dormouse-Signature", "")
    try:
        t, v1 = signature.removeprefix("t=").split(",v1=")
        fresh = abs(time.time() - int(t)) < 300
    except ValueError:
        return False
    expected = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return fresh and hmac.compare_digest(expected, v1)


def handler(chat, secret):
    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if not verified(secret, self.headers, body):
                return self.answer(401, {"error": "bad signature"})
            call = json.loads(body)
            event = self.headers.get("Dormouse-Event")
            if event == "connect":
                return self.answer(200, chat.connect(call))
            if event == "message":
                return self.answer(200, chat.message(call))
            if event == "disconnect":
                return self.answer(200, chat.disconnect(call, self.headers.get("Idempotency-Key")))
            return self.answer(400, {"error": f"unknown event {event}"})

        def answer(self, status, value):
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Hook


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--dormouse", required=True, help="Dormouse's base URL")
    parser.add_argument("--key", required=True, help="an API key with the connections capability")
    parser.add_argument("--secret", required=True, help="the hook's secret")
    args = parser.parse_args()
    chat = Chat(args.dormouse, args.key)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(chat, args.secret.encode()))
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
