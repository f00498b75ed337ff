"""The pre-training engine: optimizer and schedule, data order, DDP, the training loop and the run folder.

Ties data (:mod:`mim_nnunet.data`), model and the checkpoint format together; the CLI only parses its options
(``mim_nnunet.cli.pretrain``) and calls :func:`command.pretrain_command`. MAE-style: :func:`engine.train_steps` is
the loop, :mod:`run` the steps around it, :mod:`folder` the run folder, :mod:`resume` what may change on resume.
"""
