"""The pre-training engine: optimizer and schedule, data order, DDP, the training loop and the run folder.

Ties data (:mod:`mim_nnunet.data`), model and the checkpoint format together; the CLI only wires them
(``mim_nnunet.cli.pretrain``). MAE-style: :func:`engine.train_steps` is the loop, :mod:`run` the rest.
"""
