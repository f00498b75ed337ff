#!/bin/sh
# Container entry for challenges that run `sh predict.sh` in the image's working directory (/workspace):
#   FLARE22/23: docker container run --gpus=... --rm -v $PWD/inputs/:/workspace/inputs/ \
#                 -v $PWD/outputs/:/workspace/outputs/ IMAGE /bin/bash -c "sh predict.sh"
#   AMOS22:     ./input -> ./output in the working directory
# The folders come from the profile baked into the image (MIM_SUBMIT_PROFILE); MIM_SUBMIT_ROOT, MIM_SUBMIT_INPUT
# and MIM_SUBMIT_OUTPUT override them (tests run this script outside Docker that way).
set -e
exec "${MIM_SUBMIT_PYTHON:-python}" -m mim_nnunet.submission.container.entry "$@"
