"""Producers: what puts work on the queues (a retag run, uploads, the nightly start). They ask catalog
functions for ids and publish through :mod:`worker.producers.send`, the one send path; no SQL here."""
