"""An OpenAI-compatible chat endpoint for tests, run in its own process: `python tests/llm_server.py`
prints its port, then serves the project's LoopbackServer (same faults, same request log) with

    POST /v1/chat/completions  a caption for each one asked for ("Write 3 different captions" ->
                               three numbered lines, each naming the sample's title), after
                               `delay` seconds; a sample whose title holds "case-refusal" is refused,
                               one holding "case-echo" gets a 400 that quotes the request's headers
    GET  /_fault?kind=K&times=N&retry_after=S&seconds=S   queue a loopback fault on the chat path
    GET  /_delay?seconds=S      the time each answer takes
    GET  /_log                  every chat request: headers and JSON body, in arrival order
    GET  /_stats                the most chat requests ever in flight at once

Being another process, it answers while the test's threads are busy and sees the client's
concurrency as a real server would.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopback import LoopbackServer, Request, Response  # noqa: E402

CHAT = "/v1/chat/completions"
DATA = re.compile(r"<sample_data>\n(.*)\n</sample_data>", re.DOTALL)
MANY = re.compile(r"Write (\d+) different captions")


class ChatServer:
    def __init__(self) -> None:
        self.server = LoopbackServer()
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def start(self) -> int:
        self.server.start()
        self.server.add_handler(CHAT, self.chat)
        self.server.add_handler("/_fault", self.fault)
        self.server.add_handler("/_delay", self.set_delay)
        self.server.add_handler("/_log", self.log)
        self.server.add_handler("/_stats", lambda _r: Response.json({"max_in_flight": self.max_in_flight}))
        return self.server.port

    def fault(self, request: Request) -> Response:
        options = {name: float(request.query[name]) for name in ("seconds",) if name in request.query}
        if "retry_after" in request.query:
            options["retry_after"] = request.query["retry_after"]
        self.server.fault(CHAT, request.query["kind"], times=int(request.query.get("times", 1)), **options)
        return Response.json({"ok": True})

    def set_delay(self, request: Request) -> Response:
        self.delay = float(request.query["seconds"])
        return Response.json({"ok": True})

    def log(self, _request: Request) -> Response:
        entries = [{"headers": r.headers, "body": r.body.decode("utf-8", "replace")}
                   for r in self.server.requests_to(CHAT)]
        return Response.json(entries)

    def chat(self, request: Request) -> Response:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            return self.answer(request)
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer(self, request: Request) -> Response:
        body = json.loads(request.body)
        user = body["messages"][-1]["content"]
        found = DATA.search(user)
        title = json.loads(found.group(1))["metadata"].get("title", "") if found else ""
        if "case-echo" in title:
            return Response.text(f"bad request; headers were {request.headers}", status=400)
        if "case-refusal" in title:
            content = "I'm sorry, but I can't help with that request."
        else:
            many = MANY.search(user)
            n = int(many.group(1)) if many else 1
            words = " ".join(re.findall(r"[a-z]+", title.lower()))
            lines = [f"The sound of {words} is heard, take {i + 1}." for i in range(n)]
            content = "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines)) if n > 1 else lines[0]
        return Response.json({"id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}]})


if __name__ == "__main__":
    port = ChatServer().start()
    print(port, flush=True)
    sys.stdin.read()  # serve until the test closes our stdin (or dies)
