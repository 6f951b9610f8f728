"""The worker's process context: one model per process, CPU inference split over threads."""

from __future__ import annotations

from dataclasses import replace

import torch

from catalog.settings import Settings


def test_a_second_context_in_the_process_keeps_its_model_threads(monkeypatch, tmp_path):
    """The first context sets torch to one intra-op thread (it splits batches over its own threads); a
    second one (other settings: ``get_context`` rebuilds) used to read that 1 back as the core count and
    ran its model on one core (seen as a halved model stage in bench.e2e's second kind)."""
    from worker.context import WorkerContext, _default_torch_threads

    monkeypatch.delenv("STYLETAG_TORCH_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        first = replace(Settings.from_env(), database_url=f"sqlite:///{tmp_path}/a.db")
        a = WorkerContext(first, device="cpu")
        assert a.predictor is not None
        b = WorkerContext(replace(first, database_url=f"sqlite:///{tmp_path}/b.db"), device="cpu")
        assert b.predictor is not None
        assert torch.get_num_threads() == 1
        assert a.model_threads == b.model_threads == _default_torch_threads() >= 1
    finally:
        torch.set_num_threads(before)
