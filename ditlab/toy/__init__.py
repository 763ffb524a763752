"""The toy identity task and its instruments: the task and presets, the per-timestep probe, a run's
evaluations, the interventions on one channel, and the readers of toy run directories."""
