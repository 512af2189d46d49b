"""Peers side by side: plain Celery, Huey, Dramatiq, RQ, arq and the platform in one run.

``python -m bench.peers`` (from the repository root; ``pip install -e '.[bench]'``) starts a
private ``redis-server`` (a free port in 16300-16399, no persistence, one database per peer),
and in each round, for each peer in turn (the order rotates every round, so load drift hits
all alike):

1. **bulk enqueue**: N no-op jobs through the peer's bulk API where it has one (RQ
   ``Queue.enqueue_many``; the platform ``--platform-bulk``, ``synth_workers.enqueue_many``
   when it exists), no worker running; the backlog is checked and discarded;
2. **single enqueue**: N no-op jobs, one call each, no worker running (jobs/s = N / seconds);
3. **drain**: start the peer's workers and time from the backlog's first shrink until it is
   empty and nothing is in flight (jobs/s = N / that time), then check the peer's own record
   of what ran where it keeps one;
4. **idle latency**: with the workers idle, enqueue a probe, which records when it started;
   wait until it has, pause ``--gap``, again (``--samples``): enqueue -> task start p50/p95/p99;
   for the platform also enqueue -> ``JobHandle.wait()`` returning.

Each producer runs in a fresh process (``bench/peers/client.py``). The figures are the median
over the rounds with their range; machine, versions, date and load average are printed and
written to ``bench/results/peers.json`` and ``peers.md``. See ``bench/README.md``.
"""
