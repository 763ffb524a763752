"""The library under the commands: run set-up, training, data, checkpoints, sampling, evaluation, outlier
analysis, diffusers interop, jobs and the toy study (ditlab.toy)."""
