"""Tasks the batch-tier tests run in real worker processes (SYNTH_INCLUDE): an LLM call that
records each completion it commits, and a chord body that collects the answers."""

from __future__ import annotations

from typing import Any

from synth_workers import Task, app
from tasks.llm_calls import call_llm, record_usage, usage_of


@app.task(name="tests.batch_tasks.ask", bind=True)
def ask(self: Task, prompt: str, provider: str = "openai", model: str = "gpt-test-mini") -> None:
    """Ask the model; a row per completion (``test_duplicates``: a second one would be an
    answer applied twice) and the usage commit with the job (its result is None)."""
    completion = call_llm(self, provider, model, prompt=prompt, system=None, max_tokens=32)
    usage = usage_of(self, provider, model, completion)
    with self.effect_transaction() as conn:
        conn.execute("INSERT INTO test_duplicates (job_id) VALUES (%s)", (self.request.id,))
        record_usage(conn, str(self.request.id), None, None, usage)


@app.task(name="tests.batch_tasks.answer", bind=True)
def answer(self: Task, prompt: str, provider: str = "openai", model: str = "gpt-test-mini") -> str:
    """Ask the model; the answer is the job's result (its usage recorded once per job)."""
    completion = call_llm(self, provider, model, prompt=prompt, system=None, max_tokens=32)
    with self.synth_app.ledger.connection() as conn:
        usage = usage_of(self, provider, model, completion)
        record_usage(conn, str(self.request.id), None, None, usage)
    return completion.text


@app.task(name="tests.batch_tasks.collect")
def collect(answers: list[Any]) -> list[Any]:
    """A chord body: the header's answers, in order."""
    return list(answers)


@app.task(name="tests.batch_tasks.always_deferred", bind=True, deferrable=True)
def always_deferred(self: Task, prompt: str) -> None:
    """A task whose calls are always deferrable (the task option, no header needed)."""
    completion = call_llm(
        self, "openai", "gpt-test-mini", prompt=prompt, system=None, max_tokens=32
    )
    with self.effect_transaction() as conn:
        conn.execute("INSERT INTO test_duplicates (job_id) VALUES (%s)", (self.request.id,))
    del completion
