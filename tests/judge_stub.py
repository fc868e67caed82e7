"""A real OpenAI-compatible HTTP server on 127.0.0.1 that answers with scripted logprobs.

Used by the judge tests instead of a remote API (which cannot run here): it speaks the wire
format of /v1/chat/completions (logprobs, top_logprobs, vLLM's continue_final_message),
/v1/models and vLLM's /tokenize, the Batch API (/v1/files, /v1/batches: each line answered as the chat
endpoint would), checks the bearer key, and can inject 429/500 failures and delays.

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
        self.lock = threading.RLock()
        self.files: dict[str, str] = {}  # the Batch API's files: id -> JSONL text
        self.uploads: list[str] = []  # each upload's purpose
        self.batches: dict[str, dict] = {}
        self.batch_lines = 0  # batch requests answered
        self.hold = threading.Event()  # set: batches stay in_progress until finish_batches()
        self.batch_error: Callable[[dict], bool] | None = None  # a request body -> answer it with an HTTP 400
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

    def complete(self, body: dict) -> dict:
        """A chat completion's response body: one token, its top logprobs, the usage (the stub's "tokens": words)."""
        msgs = body["messages"]
        prompt = msgs[0]["content"]
        prefix = msgs[-1]["content"] if body.get("continue_final_message") and msgs[-1]["role"] == "assistant" else ""
        dist = self._dist(prompt, prefix)
        top = sorted(dist.items(), key=lambda kv: -kv[1])[: body.get("top_logprobs", 20)]
        tops = [{"token": t, "logprob": math.log(p) if p > 0 else -9999.0, "bytes": None} for t, p in top]
        choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": top[0][0]},
                  "logprobs": {"content": [{**tops[0], "top_logprobs": tops}]}}
        words = sum(len(m["content"].split()) for m in msgs)
        with self.lock:
            self.prompt_tokens += words
            self.completion_tokens += 1
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [choice], "usage": {"prompt_tokens": words, "completion_tokens": 1, "total_tokens": words + 1}}

    # --- the Batch API: POST /v1/files, POST /v1/batches, GET /v1/batches/ID, GET /v1/files/ID/content ----------

    def finish_batches(self) -> None:
        """Answer every batch in progress (each line as the chat endpoint would) and mark it completed; while
        `hold` is set, batches stay in_progress until this is called."""
        with self.lock:
            todo = [b for b in self.batches.values() if b["status"] == "in_progress"]
        for b in todo:
            out = []
            for line in self.files[b["input_file_id"]].splitlines():
                req = json.loads(line)
                self.batch_lines += 1
                if self.batch_error and self.batch_error(req["body"]):
                    resp = {"status_code": 400, "body": {"error": {"message": "prompt too long"}}}
                else:
                    resp = {"status_code": 200, "body": self.complete(req["body"])}
                out.append(json.dumps({"id": f"r-{len(out)}", "custom_id": req["custom_id"], "response": resp,
                                       "error": None}))
            with self.lock:
                fid = f"file-{len(self.files)}"
                self.files[fid] = "\n".join(out) + "\n"
                b.update(status="completed", output_file_id=fid)

    def batch_object(self, bid: str) -> dict:
        b = self.batches[bid]
        if b["status"] == "in_progress" and not self.hold.is_set():
            self.finish_batches()
        n = len(self.files[b["input_file_id"]].splitlines())
        done = n if b["status"] == "completed" else 0
        return {"id": bid, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": b["input_file_id"],
                "completion_window": b["window"], "status": b["status"], "created_at": 0,
                "output_file_id": b["output_file_id"], "error_file_id": None, "errors": None,
                "request_counts": {"total": n, "completed": done, "failed": 0}}

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
                if "/batches/" in self.path or "/files/" in self.path:
                    return self._batch_get()
                if self.path.endswith("/models"):
                    return self._send(200, {"object": "list", "data": [{"id": "stub-judge", "object": "model"}]})
                self._send(404, {"error": {"message": "no such path"}})

            def _batch_get(self):
                parts = self.path.strip("/").split("/")  # v1/batches/ID | v1/files/ID/content
                if parts[1] == "batches" and parts[2] in stub.batches:
                    return self._send(200, stub.batch_object(parts[2]))
                if parts[1] == "files" and len(parts) == 4 and parts[2] in stub.files:
                    data = stub.files[parts[2]].encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                self._send(404, {"error": {"message": "no such batch or file"}})

            def _batch_post(self, raw: bytes):
                if self.path.endswith("/files"):  # multipart: purpose, file
                    from email.parser import BytesParser
                    from email.policy import HTTP

                    msg = BytesParser(policy=HTTP).parsebytes(
                        f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw)
                    fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                              for part in msg.iter_parts()}
                    with stub.lock:
                        fid = f"file-{len(stub.files)}"
                        stub.files[fid] = fields["file"].decode()
                        stub.uploads.append(fields["purpose"].decode())
                    return self._send(200, {"id": fid, "object": "file", "bytes": len(fields["file"]), "created_at": 0,
                                            "filename": "batch.jsonl", "purpose": "batch", "status": "processed"})
                body = json.loads(raw or b"{}")  # /batches
                with stub.lock:
                    bid = f"batch-{len(stub.batches)}"
                    stub.batches[bid] = {"input_file_id": body["input_file_id"], "status": "in_progress",
                                         "window": body["completion_window"], "output_file_id": None}
                self._send(200, stub.batch_object(bid))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.endswith(("/files", "/batches")):
                    if not self._authorized():
                        return self._send(401, {"error": {"message": "bad key"}})
                    return self._batch_post(raw)
                body = json.loads(raw or b"{}")
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
                self._send(200, stub.complete(body))
        return H
