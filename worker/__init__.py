"""The part that does the job: Celery app and tasks, the fetch/decode/infer/write pipeline, the retag
producer, upload micro-batching, the GPU-pinned launcher and the ``styletag`` CLI.

Wires ``catalog`` (SQL, storage) and ``model`` (predictor) together.
"""
