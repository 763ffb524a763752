"""The library under the commands, in layers that import only downwards (tests/test_layers.py): errors and
files at the bottom; checkpoints, data, sampling, evaluation, training and analysis above them; the toy
task and its instruments (ditlab.toy); the studies on their shared runner at the top (ditlab.studies)."""
