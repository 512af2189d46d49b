"""The batch tier: deferrable LLM and embedding requests through the providers' batch APIs
(OpenAI's Batch API, Anthropic's Message Batches), at the batch price, without changing how
a job looks to the application.

- :mod:`~synth_workers.batchtier.collector` — the task side: a deferrable job's first run
  records its request and parks the job (still ``running`` in the ledger); its next run,
  once the answer is back, reads it instead of calling the provider.
- :mod:`~synth_workers.batchtier.tier` — the loop in each worker's main process: submit
  batches (intent first), recover unrecorded ones, poll, and write results back.
- :mod:`~synth_workers.batchtier.api` — the SDK calls; :mod:`~synth_workers.ledger.batches`
  — every statement (tables ``synth_batches`` and ``synth_batch_items``, migration 0010).
- :mod:`~synth_workers.batchtier.settings` — ``SYNTH_BATCH_*``.

Nothing is imported here: the settings import this package, and the tier imports them.
"""
