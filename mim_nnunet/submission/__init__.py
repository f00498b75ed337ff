"""Challenge submissions from trained nnU-Net models: predict, convert to a profile, validate, zip, evaluate.

profiles.py   challenge profiles (profiles/*.json): naming, label sets, format, layout
predict.py    nnU-Net's predictor, ensembling and determined post-processing for -m model folders
package.py    conversion to the profile's files, deterministic zip, manifest
validate.py   per-case checks (exists, geometry, dtype, labels) and their report
evaluate.py   Dice (nnU-Net's) and normalised surface Dice
lesions.py    lesion-wise scores: connected components, one-to-one matching, sensitivity, false positives
pipeline.py   the order of the steps and the output folder
container/    Dockerfile + entry script for container-based challenges

Nothing here imports the pre-training code (model, masking, losses, engine, checkpoint): a MiM-fine-tuned model
is an ordinary nnU-Net model folder. CLI: ``mim_nnunet_submit`` (mim_nnunet/cli/submit.py); guide:
docs/submission.md.
"""
