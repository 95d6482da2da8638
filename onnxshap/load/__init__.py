"""Load: models (paths, bytes, protos, framework models) and data (arrays of every common kind)."""
