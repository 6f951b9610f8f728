"""The part that does the job, wiring ``catalog`` (SQL, storage) and ``model`` (predictor) together.

* the core: the Celery app (``app``), its tasks (``tasks``, ``batching``, ``messages``), the
  fetch/decode/infer/write ``pipeline`` and the per-process model ``context``;
* ``producers/``: what puts work on the queues (retag runs, uploads, the nightly start), through one send path;
* ``ops/``: launcher, metrics, logs, run reports, beat, demo;
* ``cli``: the ``styletag`` command.

worker/ never touches catalog tables itself: it calls catalog functions.
"""
