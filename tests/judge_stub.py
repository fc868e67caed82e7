"""A real OpenAI-compatible HTTP server on 127.0.0.1 that answers with scripted logprobs.

Used by the judge tests instead of a remote API (which cannot run here): it speaks the wire
format of /v1/chat/completions (logprobs, top_logprobs, vLLM's continue_final_message),
/v1/models and vLLM's /tokenize, checks the bearer key, and can inject 429/500 failures and delays.

The judge it plays is a tiny language model over a few tokens, so tests can enumerate its exact
distribution by brute force: `script(prompt)` gives, per prompt, a first-token distribution and
digit continuations.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

END = "<|im_end|>"


def digit_model(prompt: str) -> Callable[[str], dict[str, float]]:
    """A digit-splitting judge: next-token probabilities after an answer prefix.

    'good' in the prompt → mostly 85/90, 'bad' → mostly 10/15, 'refuse' → mostly REFUSAL ('REF' first),
    'chatty' → mostly words (little mass on numbers).
    """
    def nxt(prefix: str) -> dict[str, float]:
        if "refuse" in prompt:
            table = {"": {"REF": 0.7, "8": 0.1, "The": 0.2}, "8": {"0": 0.5, END: 0.5}}
            return table.get(prefix, {END: 1.0})
        if "chatty" in prompt:
            table = {"": {"The": 0.6, "I": 0.25, "9": 0.1, "1": 0.05}}
            return table.get(prefix, {"0": 0.5, END: 0.5} if len(prefix) == 1 else {END: 1.0})
        if "good" in prompt:
            table = {"": {"8": 0.5, "9": 0.4, "1": 0.1}, "8": {"5": 0.8, "0": 0.15, END: 0.05},
                     "9": {"0": 0.9, "5": 0.1}, "1": {"0": 0.5, END: 0.5}, "10": {"0": 0.6, END: 0.4},
                     "100": {END: 0.9, "0": 0.1}}
        else:
            table = {"": {"1": 0.7, "2": 0.2, "7": 0.1}, "1": {"0": 0.5, "5": 0.4, END: 0.1},
                     "2": {"0": 1.0}, "7": {"5": 1.0}, "10": {END: 0.8, "0": 0.2}, "100": {END: 1.0}}
        return table.get(prefix, {END: 1.0})
    return nxt


def brute_force(nxt: Callable[[str], dict[str, float]], max_len: int = 5) -> dict[int, float]:
    """P(the answer's leading digit run spells v, v in 0..100), by enumerating every digit sequence."""
    out: dict[int, float] = {}

    def walk(prefix: str, p: float) -> None:
        dist = nxt(prefix)
        stop = sum(q for t, q in dist.items() if not (t.strip() if not prefix else t).isdigit())
        s = prefix.strip()
        if s and s.isdigit() and (len(s) == 1 or s[0] != "0") and int(s) <= 100:
            out[int(s)] = out.get(int(s), 0.0) + p * stop
        if len(prefix) >= max_len:
            return
        for t, q in dist.items():
            tt = t.strip() if not prefix else t
            if tt.isdigit() and q > 0:
                walk(prefix + tt, p * q)
    walk("", 1.0)
    return out


class StubJudge:
    """Context manager: a threaded HTTP server; `.url` is its /v1 base URL."""

    def __init__(self, *, key: str | None = None, mode: str = "digits", fail: list[int] | None = None,
                 delay_s: float = 0.0, single: Callable[[str], dict[str, float]] | None = None):
        self.key = key
        self.mode = mode  # digits | single
        self.fail = list(fail or [])  # HTTP statuses to answer with, one per request, before succeeding
        self.delay_s = delay_s
        self.single = single
        self.requests = 0
        self.prompt_tokens = 0  # summed over the answered requests (the usage the stub reported)
        self.completion_tokens = 0
        self.auth_seen: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _dist(self, prompt: str, prefix: str) -> dict[str, float]:
        if self.mode == "single":
            return (self.single or (lambda p: {"85": 0.6, "90": 0.3, "The": 0.1}))(prompt)
        return digit_model(prompt)(prefix)

    def _handler(self):
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                got = self.headers.get("Authorization", "")
                with stub.lock:
                    stub.auth_seen.add(got)
                return stub.key is None or got == f"Bearer {stub.key}"

            def do_GET(self):
                if not self._authorized():
                    return self._send(401, {"error": {"message": "bad key"}})
                if self.path.endswith("/models"):
                    return self._send(200, {"object": "list", "data": [{"id": "stub-judge", "object": "model"}]})
                self._send(404, {"error": {"message": "no such path"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/tokenize":
                    text = body.get("prompt", "")
                    toks = list(text) if stub.mode == "digits" else [text]
                    return self._send(200, {"tokens": list(range(len(toks))), "count": len(toks)})
                if not self._authorized():
                    return self._send(401, {"error": {"message": "bad key"}})
                with stub.lock:
                    stub.requests += 1
                    status = stub.fail.pop(0) if stub.fail else 200
                if stub.delay_s:
                    time.sleep(stub.delay_s)
                if status != 200:
                    return self._send(status, {"error": {"message": f"injected {status}"}})
                msgs = body["messages"]
                prompt = msgs[0]["content"]
                prefix = msgs[-1]["content"] if body.get("continue_final_message") and msgs[-1]["role"] == "assistant" else ""
                dist = stub._dist(prompt, prefix)
                top = sorted(dist.items(), key=lambda kv: -kv[1])[: body.get("top_logprobs", 20)]
                tops = [{"token": t, "logprob": math.log(p) if p > 0 else -9999.0, "bytes": None} for t, p in top]
                choice = {"index": 0, "finish_reason": "length",
                          "message": {"role": "assistant", "content": top[0][0]},
                          "logprobs": {"content": [{**tops[0], "top_logprobs": tops}]}}
                words = sum(len(m["content"].split()) for m in msgs)  # the stub's "tokens": words
                with stub.lock:
                    stub.prompt_tokens += words
                    stub.completion_tokens += 1
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                                 "choices": [choice], "usage": {"prompt_tokens": words, "completion_tokens": 1,
                                                                "total_tokens": words + 1}})
        return H
