"""judge.batch=true: the same judgements through an OpenAI-compatible Batch API (POST /v1/files, /v1/batches), at
its price and latency (OpenAI's: half the price, within judge.batch_window).

Every judgement runs the same scoring as online (emq.judge.scoring: one request per judgement with single_token, a
walk over digit prefixes with digits); each request is the body an online request sends. The walks run together as
coroutines: the requests all of them wait for go out as one batch (a round), and its answers let the walks take
their next step; single_token needs one round, the digit walk one per digit. So the same answers give the same
scores as online.

Resumable: each batch's id is written to `<work dir>/batch.json` the moment it is submitted, and every answer
downloaded to `<work dir>/answers.jsonl`. A killed process, run again, polls the batch it had submitted (it never
submits it twice), and the walks replay the answers they already have without asking again. The API key is read
from the environment at the moment of use, as online; it is in no file here.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emq.errors import EmqError
from emq.judge import scoring
from emq.judge.backends import backend
from emq.judge.plan import JudgePlan, scrub
from emq.records import JsonlWriter, read_json, read_jsonl, write_json
from emq.schema import JudgeConfig, Scoring

log = logging.getLogger(__name__)

STATE = "batch.json"  # the batch in flight: its id, its round, the ids of its requests
ANSWERS = "answers.jsonl"  # every answer downloaded: {"id", "dist"|"error", "usage"}
ENDPOINT = "/v1/chat/completions"
DONE = ("completed", "failed", "expired", "cancelled")


class RequestFailed(Exception):
    """The batch answered this one request with an error (too long for the judge …): its judgement records it."""


@dataclass
class Pending:
    body: dict[str, Any]
    futures: list[asyncio.Future] = field(default_factory=list)


class BatchJudge:
    """Asks through batches: `ask` answers from what was downloaded, else waits for the next round."""

    def __init__(self, cfg: JudgeConfig, plan: JudgePlan, base_url: str, work: Path, *, model_name: str | None = None):
        from openai import OpenAI

        self.cfg, self.plan, self.work = cfg, plan, Path(work)
        self.model = model_name or plan.model
        self.client = OpenAI(base_url=base_url, api_key=backend(plan.kind).api_key(cfg), timeout=cfg.timeout_s,
                             max_retries=cfg.max_retries)
        self.work.mkdir(parents=True, exist_ok=True)
        self.answers: dict[str, dict[str, Any]] = {r["id"]: r for r in read_jsonl(self.work / ANSWERS)}
        self.pending: dict[str, Pending] = {}
        self.requests = self.prompt_tokens = self.completion_tokens = self.batches = 0
        self.resumed = 0  # answers this call found downloaded by an earlier (killed) one
        self.empty_rounds = 0

    async def ask(self, prompt: str, prefix: str = "") -> scoring.TokenDist:
        body = scoring.request_body(self.model, prompt, prefix, self.cfg.top_logprobs)  # as online
        rid = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
        if rid in self.answers:
            return self._answer(self.answers[rid])
        fut = asyncio.get_running_loop().create_future()
        self.pending.setdefault(rid, Pending(body)).futures.append(fut)
        return self._answer(await fut)

    @staticmethod
    def _answer(a: dict[str, Any]) -> scoring.TokenDist:
        if a.get("error"):
            raise RequestFailed(a["error"])
        return a["dist"]

    async def judge(self, prompt: str, categories: list[str]) -> scoring.Judgement:
        method = Scoring(self.plan.scoring)
        try:
            return await scoring.judge_with(self.ask, method, prompt, categories, self.cfg)
        except RequestFailed as e:  # as online: this one prompt cannot be judged; recorded, not fatal
            return scoring.Judgement(None, None, 0.0, method.value, error=scrub(str(e)[:300], self.cfg))

    # --- one round: submit what the walks wait for, poll, download -----------------------------------------

    def resume(self, bar) -> None:
        """A batch an earlier (killed) call submitted and did not download: poll it and keep its answers."""
        state = read_json(self.work / STATE)
        if state.get("batch_id"):
            log.info("judge batch: resuming batch %s (round %s, %d requests) submitted by an earlier run",
                     state["batch_id"], state.get("round"), len(state.get("ids", [])))
            before = len(self.answers)
            self._finish(state["batch_id"], bar)
            self.resumed += len(self.answers) - before

    def round(self, bar) -> None:
        """Submit every request the walks wait for as one batch; resolve their futures from its answers (a request
        the batch did not answer — an expired window — waits for the next round)."""
        ids = sorted(self.pending)
        lines = "".join(json.dumps({"custom_id": rid, "method": "POST", "url": ENDPOINT,
                                    "body": self.pending[rid].body}) + "\n" for rid in ids)
        upload = self.client.files.create(file=("emq-judge-batch.jsonl", io.BytesIO(lines.encode())),
                                          purpose="batch")
        batch = self.client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT,
                                           completion_window=self.cfg.batch_window,
                                           metadata={"emq": "judge", "round": str(self.batches + 1)})
        write_json(self.work / STATE, {"batch_id": batch.id, "input_file_id": upload.id, "round": self.batches + 1,
                                       "ids": ids, "submitted_unix": round(time.time(), 1)})
        self.batches += 1
        self.requests += len(ids)
        log.info("judge batch: round %d submitted as %s (%d requests)", self.batches, batch.id, len(ids))
        self._finish(batch.id, bar)
        if not any(rid in self.answers for rid in ids):  # nothing came back: the endpoint keeps refusing
            self.empty_rounds += 1
            if self.empty_rounds > self.cfg.max_retries:
                raise EmqError(f"the judge's batches answered none of {len(ids)} requests {self.empty_rounds} times "
                               "in a row", "run the same command later (judgements made are kept), or "
                               "judge.batch=false to judge online")
        for rid in ids:
            if rid in self.answers:
                p = self.pending.pop(rid)
                for f in p.futures:
                    if not f.done():
                        f.set_result(self.answers[rid])

    def _finish(self, batch_id: str, bar) -> None:
        """Poll `batch_id` until it ends (progress on `bar`), download its answers, drop the state."""
        while True:
            b = self.client.batches.retrieve(batch_id)
            counts = b.request_counts
            if counts is not None and counts.total:
                bar.set_postfix_str(f"batch {batch_id}: {b.status}, {counts.completed}/{counts.total} answered",
                                    refresh=True)
            if b.status in DONE:
                break
            time.sleep(self.cfg.batch_poll_s)
        got = 0
        with JsonlWriter(self.work / ANSWERS) as out:
            for file_id in (b.output_file_id, b.error_file_id):
                if not file_id:
                    continue
                for line in self.client.files.content(file_id).text.splitlines():
                    if line.strip():
                        a = self._read_line(json.loads(line))
                        if a is not None and a["id"] not in self.answers:
                            self.answers[a["id"]] = a
                            out.write(a)
                            got += 1
        (self.work / STATE).unlink(missing_ok=True)
        log.info("judge batch: %s %s, %d answers downloaded", batch_id, b.status, got)
        if b.status in ("failed", "cancelled") and not got:
            errors = "; ".join(f"{e.code}: {e.message}" for e in ((b.errors.data or []) if b.errors else []))[:400]
            raise EmqError(f"the judge's batch {batch_id} {b.status}{': ' + scrub(errors, self.cfg) if errors else ''}",
                           "run the same command again to submit a new batch (judgements made are kept), or "
                           "judge.batch=false to judge online")

    def _read_line(self, line: dict[str, Any]) -> dict[str, Any] | None:
        """An output (or error) file's line → {"id", "dist" | "error", "usage"}; None for a line to ask again
        (a 429/5xx the batch gave up on)."""
        rid, resp, err = line.get("custom_id"), line.get("response") or {}, line.get("error")
        status, body = resp.get("status_code"), resp.get("body") or {}
        if status == 200:
            usage = body.get("usage") or {}
            self.prompt_tokens += usage.get("prompt_tokens") or 0
            self.completion_tokens += usage.get("completion_tokens") or 0
            choices = body.get("choices") or []
            content = ((choices[0].get("logprobs") or {}).get("content") or []) if choices else []
            dist = {t["token"]: t["logprob"] for t in content[0]["top_logprobs"]} if content else {}
            return {"id": rid, "dist": dist, "usage": usage}
        if status is not None and (status in (408, 409, 425, 429) or status >= 500) or (err and not status):
            return None
        message = (body.get("error") or {}).get("message") or (err or {}).get("message") or "no answer"
        return {"id": rid, "error": f"HTTP {status}: {message}"}

    def close(self) -> None:
        self.client.close()


def judge_batch(write, todo: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan, base_url: str, work: Path, *,
                model_name: str | None = None, desc: str = "judge (batch)", on_judged=None) -> dict[str, int]:
    """Judge `todo` through batches; `write(item, judgement)` as each is made (the caller appends it to scores).
    Returns requests, prompt/completion tokens, errors, batches and the answers resumed from a killed run."""
    from tqdm import tqdm

    judge = BatchJudge(cfg, plan, base_url, work, model_name=model_name)
    errors = 0

    async def main() -> None:
        with tqdm(total=len(todo), desc=desc, unit="ans") as bar:
            await asyncio.to_thread(judge.resume, bar)

            async def one(it: dict[str, Any]) -> None:
                nonlocal errors
                j = await judge.judge(it["text"], it["categories"])
                errors += j.error is not None
                write(it, j)
                bar.update(1)
                if on_judged is not None:
                    on_judged(bar.n)

            tasks = [asyncio.ensure_future(one(it)) for it in todo]
            try:
                while not all(t.done() for t in tasks):
                    await _settle(tasks, judge)
                    if all(t.done() for t in tasks):
                        break
                    if not judge.pending:  # pragma: no cover - a walk waits on nothing
                        raise AssertionError("judge batch: walks wait, but ask nothing")
                    await asyncio.to_thread(judge.round, bar)
                for t in tasks:
                    t.result()  # a walk's error, raised
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                judge.close()

    asyncio.run(main())
    return {"requests": judge.requests, "prompt_tokens": judge.prompt_tokens,
            "completion_tokens": judge.completion_tokens, "errors": errors, "batches": judge.batches,
            "resumed": judge.resumed}


async def _settle(tasks: list[asyncio.Task], judge: BatchJudge) -> None:
    """Let every walk run until it waits on the batch (or ends): the loop turns until nothing moves."""
    seen = None
    while True:
        for _ in range(5):
            await asyncio.sleep(0)
        now = (sum(t.done() for t in tasks), len(judge.pending), sum(len(p.futures) for p in judge.pending.values()))
        if now == seen:
            return
        seen = now
