"""Models: the spec of a transformer, its family table, presets, config.json and Hub ids (no torch)."""
