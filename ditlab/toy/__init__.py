"""The toy identity study: task and presets, probe, readers, reports, plots and the sweep."""
