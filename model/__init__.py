"""The hierarchical style model: taxonomy, network, losses, training, evaluation, checkpoints, predictor.

Never imports ``catalog`` or ``worker``. ``model.taxonomy`` and ``model.fmnist`` are torch-free so the
catalog can use them too.
"""
