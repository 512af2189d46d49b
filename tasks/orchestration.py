"""AI workflows: documents + an instruction, run on a provider's model, one job per document
(fan-out), then one aggregate job (fan-in) once every part is done.

- **Fan-out**: :func:`start_workflow` writes the ``synth_workflows`` row and one
  ``process_document`` job per document (idempotency key ``wf:<id>:part:<n>``) in one
  transaction — from app code (:func:`enqueue_workflow`) or as the ``run_workflow`` job
  (then inside its ``effect_transaction``: exactly once with its completion).
- **Fan-in exactly once**: a part job writes its output, its usage and ``done = done + 1`` in
  the same transaction as its own completion (``effect_transaction``); the part that makes
  ``done == total`` enqueues the aggregate in that transaction (key ``wf:<id>:aggregate``).
  A worker that dies mid-way commits nothing: its part runs again and counts once.
  A dead-lettered part leaves the workflow ``running`` (``WorkflowHandle.wait`` raises
  ``JobFailedError``); replaying it (``synth-workers dlq replay``) completes the workflow.
- **Aggregate**: combines the outputs (asking the model with ``aggregate_instruction`` when
  given), marks the workflow completed, enqueues the notification email (template
  ``workflow_completed``, key ``wf:<id>:notify``) in the same transaction, then announces
  ``workflow_completed``.
- **Provider errors**: 429 re-schedules the job after Retry-After *without using an
  attempt* (and pauses every worker for that model); 5xx, connection errors and timeouts
  retry; 400/401/404 dead-letter. A shared quota governor (``synth_workers.limits``) keeps
  requests and tokens per window per (provider, model) across all workers.
- **Usage**: tokens and credits per job in ``synth_usage`` (exactly once, with the job's
  completion) and a ``usage`` lifecycle announcement for metrics.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
from celery import shared_task
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, EmailStr, Field

from synth_workers.batchtier.collector import HEADER
from synth_workers.errors import (
    JobFailedError,
    JobNotFoundError,
    JobTimeoutError,
    PermanentError,
)
from synth_workers.producer import enqueue
from synth_workers.providers.llm import Provider
from synth_workers.task import Task
from tasks.llm_calls import Usage, announce_usage, call_llm, record_usage, usage_of

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery

#: SYNTH_LLM_TIMEOUT (at most 240 s) stays below this.
SOFT_TIME_LIMIT = 300
PART_TASK = "tasks.orchestration.process_document"
AGGREGATE_TASK = "tasks.orchestration.aggregate_workflow"


class Document(BaseModel):
    id: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=100_000)


class WorkflowPayload(BaseModel):
    """An AI workflow: each document is run through ``instruction`` on ``provider``/``model``."""

    workflow_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    name: str | None = Field(default=None, max_length=200)
    documents: list[Document] = Field(min_length=1, max_length=1000)
    instruction: str = Field(min_length=1, max_length=20_000)
    provider: Provider
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int = Field(default=512, ge=1, le=32_000)
    #: Ask the model to combine the parts' outputs; unset: the outputs are listed in order.
    aggregate_instruction: str | None = Field(default=None, max_length=20_000)
    #: Addresses mailed (template ``workflow_completed``) once the workflow completed.
    notify: list[EmailStr] = Field(default_factory=list, max_length=100)
    user_id: str | None = Field(default=None, max_length=200)
    #: Not urgent: the model calls may wait for the provider's batch API (half the price,
    #: within its completion window); see ``synth_workers.batchtier``.
    deferrable: bool = False


class PartPayload(BaseModel):
    """One document of a workflow."""

    workflow_id: uuid.UUID
    index: int = Field(ge=0)
    document: Document
    instruction: str
    provider: Provider
    model: str
    max_tokens: int = 512
    user_id: str | None = None


class AggregatePayload(BaseModel):
    workflow_id: uuid.UUID


# --- fan-out ------------------------------------------------------------------------------


def start_workflow(
    payload: WorkflowPayload, conn: psycopg.Connection[Any], app: SynthCelery
) -> list[str]:
    """Write the workflow and enqueue its part jobs in ``conn``'s open transaction (published
    once it commits); a second call for the same workflow id adds nothing. Returns job ids."""
    wid = str(payload.workflow_id)
    inserted = conn.execute(
        "INSERT INTO synth_workflows (id, name, user_id, provider, model, instruction, "
        "aggregate_instruction, max_tokens, notify, total) VALUES (%s, %s, %s, %s, %s, %s, %s,"
        " %s, %s, %s) ON CONFLICT (id) DO NOTHING",
        (
            wid,
            payload.name,
            payload.user_id,
            payload.provider,
            payload.model,
            payload.instruction,
            payload.aggregate_instruction,
            payload.max_tokens,
            Jsonb([str(a) for a in payload.notify]),
            len(payload.documents),
        ),
    ).rowcount
    if not inserted:
        return []
    jobs = []
    for index, document in enumerate(payload.documents):
        part = PartPayload(
            workflow_id=payload.workflow_id,
            index=index,
            document=document,
            instruction=payload.instruction,
            provider=payload.provider,
            model=payload.model,
            max_tokens=payload.max_tokens,
            user_id=payload.user_id,
        )
        handle = enqueue(
            PART_TASK,
            part,
            idempotency_key=f"wf:{wid}:part:{index}",
            conn=conn,
            deferrable=payload.deferrable,
            app=app,
        )
        jobs.append(handle.id)
    return jobs


def _app(app: SynthCelery | None) -> SynthCelery:
    if app is None:
        from synth_workers.app import app as default_app

        return default_app
    return app


class WorkflowHandle:
    """A workflow that was started: its row, state, and a wait for its result."""

    def __init__(self, workflow_id: str, app: SynthCelery | None = None) -> None:
        self.id = workflow_id
        self._app = _app(app)

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"

    def info(self) -> dict[str, Any]:
        row = workflow(self.id, self._app)
        if row is None:
            raise JobNotFoundError(self.id, f"no workflow {self.id}")
        return row

    def state(self) -> str:
        """``running``, ``aggregating`` or ``completed``."""
        return str(self.info()["state"])

    def wait(self, timeout: float | None = None, poll: float = 0.1) -> Any:
        """Block until the workflow completed; return its result (``summary``, ``outputs``).
        Raises JobFailedError when one of its jobs was dead-lettered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            row = self.info()
            if row["state"] == "completed":
                return row["result"]
            with self._app.ledger.connection() as conn:
                # a dead job counts until a replay of it (dlq replay) is alive or done
                dead = conn.execute(
                    "SELECT id, error_class, last_error FROM synth_jobs j WHERE state = 'dead' "
                    "AND task = ANY(%s) AND payload->>'workflow_id' = %s AND NOT EXISTS "
                    "(SELECT 1 FROM synth_jobs r WHERE r.replay_of = j.id AND r.state <> 'dead')"
                    " LIMIT 1",
                    ([PART_TASK, AGGREGATE_TASK], self.id),
                ).fetchone()
            if dead is not None:
                raise JobFailedError(str(dead[0]), dead[1] or "?", dead[2] or "")
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(self.id, f"workflow {self.id} still {row['state']}")
            time.sleep(poll)


def enqueue_workflow(
    payload: WorkflowPayload | dict[str, Any], app: SynthCelery | None = None
) -> WorkflowHandle:
    """Start a workflow from app code: its row and part jobs commit in one transaction."""
    app = _app(app)
    model = WorkflowPayload.model_validate(payload) if isinstance(payload, dict) else payload
    with app.ledger.connection() as conn, conn.transaction():
        app.ledger.durable(conn)
        start_workflow(model, conn, app)
    return WorkflowHandle(str(model.workflow_id), app)


@shared_task(name="tasks.orchestration.run_workflow", bind=True, payload_model=WorkflowPayload)
def run_workflow(self: Task, payload: WorkflowPayload) -> dict[str, Any]:
    """Fan-out as a job: the workflow and its part jobs commit with this job's completion."""
    with self.effect_transaction() as conn:
        jobs = start_workflow(payload, conn, self.synth_app)
    return {"workflow_id": str(payload.workflow_id), "parts": len(jobs)}


# --- the part jobs and fan-in -------------------------------------------------------------


def record_part(
    conn: psycopg.Connection[Any], payload: PartPayload, job_id: str, output: str
) -> bool:
    """Write the part's output and count it; True when it was the last part (then the
    workflow moves to ``aggregating``). In the part job's completion transaction."""
    wid = str(payload.workflow_id)
    new = conn.execute(
        "INSERT INTO synth_workflow_parts (workflow_id, index, document_id, job_id, output) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (wid, payload.index, payload.document.id, job_id, output),
    ).rowcount
    if not new:
        return False
    row = conn.execute(
        "UPDATE synth_workflows SET done = done + 1, state = CASE WHEN done + 1 >= total "
        "THEN 'aggregating' ELSE state END WHERE id = %s AND state = 'running' "
        "RETURNING done, total",
        (wid,),
    ).fetchone()
    return row is not None and row[0] >= row[1]


@shared_task(
    name=PART_TASK,
    bind=True,
    payload_model=PartPayload,
    soft_time_limit=SOFT_TIME_LIMIT,
    time_limit=SOFT_TIME_LIMIT + 30,
)
def process_document(self: Task, payload: PartPayload) -> dict[str, Any]:
    """Run one document through the model; the last part enqueues the aggregate."""
    completion = call_llm(
        self,
        payload.provider,
        payload.model,
        prompt=f"Document {payload.document.id}:\n{payload.document.text}",
        system=payload.instruction,
        max_tokens=payload.max_tokens,
    )
    usage = usage_of(self, payload.provider, payload.model, completion)
    job_id = self.request.id or str(uuid.uuid4())
    wid = str(payload.workflow_id)
    with self.effect_transaction() as conn:
        record_usage(conn, job_id, payload.user_id, wid, usage)
        if record_part(conn, payload, job_id, completion.text):
            enqueue(
                AGGREGATE_TASK,
                AggregatePayload(workflow_id=payload.workflow_id),
                idempotency_key=f"wf:{wid}:aggregate",
                conn=conn,
                deferrable=bool(getattr(self.request, HEADER, False)),
                app=self.synth_app,
            )
    announce_usage(self, payload.user_id, wid, usage)
    return {
        "workflow_id": wid,
        "index": payload.index,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
    }


def combine(parts: list[dict[str, Any]]) -> str:
    """The parts' outputs in document order, one block each."""
    return "\n\n".join(f"[{p['document_id']}]\n{p['output']}" for p in parts)


@shared_task(
    name=AGGREGATE_TASK,
    bind=True,
    payload_model=AggregatePayload,
    soft_time_limit=SOFT_TIME_LIMIT,
    time_limit=SOFT_TIME_LIMIT + 30,
)
def aggregate_workflow(self: Task, payload: AggregatePayload) -> dict[str, Any]:
    """Fan-in: combine the outputs, complete the workflow, mail and announce it."""
    app = self.synth_app
    wid = str(payload.workflow_id)
    with app.ledger.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        wf = cur.execute("SELECT * FROM synth_workflows WHERE id = %s", (wid,)).fetchone()
        parts = cur.execute(
            "SELECT index, document_id, output FROM synth_workflow_parts "
            "WHERE workflow_id = %s ORDER BY index",
            (wid,),
        ).fetchall()
    if wf is None:
        raise PermanentError(f"no workflow {wid}")
    if wf["state"] == "completed":
        return {"workflow_id": wid, "already_completed": True}
    combined = combine(parts)
    summary: str | None = None
    usage: Usage | None = None
    if wf["aggregate_instruction"]:
        completion = call_llm(
            self,
            wf["provider"],
            wf["model"],
            prompt=combined,
            system=wf["aggregate_instruction"],
            max_tokens=wf["max_tokens"],
        )
        summary = completion.text
        usage = usage_of(self, wf["provider"], wf["model"], completion)
    job_id = self.request.id or str(uuid.uuid4())
    result = {"summary": summary, "outputs": [dict(p) for p in parts]}
    with self.effect_transaction() as conn:
        if usage is not None:
            record_usage(conn, job_id, wf["user_id"], wid, usage)
        done = conn.execute(
            "UPDATE synth_workflows SET state = 'completed', result = %s, completed_at = now(),"
            " aggregate_job_id = %s WHERE id = %s AND state = 'aggregating' RETURNING id",
            (Jsonb(result), job_id, wid),
        ).fetchone()
        totals = conn.execute(
            "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), "
            "coalesce(sum(credits), 0) FROM synth_usage WHERE workflow_id = %s",
            (wid,),
        ).fetchone()
        assert totals is not None
        facts = {
            "documents": wf["total"],
            "provider": wf["provider"],
            "model": wf["model"],
            "input_tokens": int(totals[0]),
            "output_tokens": int(totals[1]),
            "credits": float(totals[2]),
            "aggregate_job": job_id,
        }
        if done is not None and wf["notify"]:
            context = {
                "workflow_id": wid,
                "workflow_name": wf["name"] or wid,
                "result": summary or combined,
                **facts,
            }
            enqueue(
                "tasks.email.send_email",
                {"to": wf["notify"], "template": "workflow_completed", "context": context},
                idempotency_key=f"wf:{wid}:notify",
                conn=conn,
                app=app,
            )
    if done is None:
        return {"workflow_id": wid, "already_completed": True}
    if usage is not None:
        announce_usage(self, wf["user_id"], wid, usage)
    app.lifecycle.announce(
        "workflow_completed",
        wid,
        task=self.name,
        queue="orchestration",
        user_id=wf["user_id"],
        data=facts,
    )
    return {"workflow_id": wid, "documents": wf["total"], "summary": summary, **facts}


def workflow(workflow_id: str, app: SynthCelery | None = None) -> dict[str, Any] | None:
    """A workflow's row (state, done/total, result) for app code and tests."""
    app = _app(app)
    with app.ledger.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM synth_workflows WHERE id = %s", (workflow_id,)).fetchone()
    return json.loads(json.dumps(row, default=str)) if row is not None else None
