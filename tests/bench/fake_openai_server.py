"""A fake OpenAI-compatible streaming server with known delays, run in its own process by the bench tests.

POST /v1/completions streams `max_tokens` chunks, waiting FIRST_TOKEN_S before the first and BETWEEN_TOKENS_S
before each next (one thread per connection, so concurrent requests do not slow each other), then a usage
chunk and [DONE]. It records what it really did: sleeps overshoot on a loaded host, so the tests compare the
benchmark's figures with these records as well as with the nominal delays. GET /v1/models lists
"fake-model"; a prompt holding "FAIL" gets an OpenAI-shaped 400; GET /stats returns the records (request
bodies, most requests in flight, per-request offsets of each chunk from the request's arrival). With an
API key given, requests without it get 401.

Its own process (not a thread of the test's): the client's event loop and the server's threads would
otherwise share one GIL, and each would delay the other's timing.

    python tests/bench/fake_openai_server.py PORT [API_KEY]
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A first token after 2 s, not 200 ms: on the shared 2-core host at a load average of 16-22 (tests run at
# nice 10), a request took 10-150 ms more to reach a server thread and its first chunk to reach the client
# than the server's own records show (the gaps between chunks agree to <1%): 5-75% of 200 ms, < 8% of 2 s.
FIRST_TOKEN_S, BETWEEN_TOKENS_S = 2.0, 0.050
PROMPT_TOKENS = 7


def make_handler(api_key: str | None):
    state = {"bodies": [], "in_flight": 0, "max_in_flight": 0, "chunk_offsets": []}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers: the client reuses its connections
        disable_nagle_algorithm = True  # as uvicorn: each chunk leaves when written

        def log_message(self, *args):
            pass

        def _json(self, status: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}":
                return True
            self._json(401, {"error": {"message": "bad key", "type": "auth", "param": None, "code": None}})
            return False

        def do_GET(self):
            if self.path == "/stats":
                with lock:
                    self._json(200, state)
            elif self._authorised():
                self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            arrived = time.perf_counter()
            if not self._authorised():
                return
            if "FAIL" in body.get("prompt", ""):
                self._json(400, {"error": {"message": "prompt refused", "type": "invalid_request_error",
                                           "param": "prompt", "code": None}})
                return
            with lock:
                state["bodies"].append(body)
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            offsets = []

            def send(event: str) -> None:  # one chunk of a chunked transfer encoding
                data = event.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                n = body["max_tokens"]
                for i in range(n):
                    time.sleep(FIRST_TOKEN_S if i == 0 else BETWEEN_TOKENS_S)
                    chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                    send(f"data: {json.dumps(chunk)}\n\n")
                    offsets.append(time.perf_counter() - arrived)
                usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}
                end = f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))  # the last chunk and the end
            finally:
                with lock:
                    state["in_flight"] -= 1
                    state["chunk_offsets"].append(offsets)

    return Handler


if __name__ == "__main__":
    key = sys.argv[2] if len(sys.argv) > 2 else None
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), make_handler(key))
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
