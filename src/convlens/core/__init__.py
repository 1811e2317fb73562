"""Core: layer discovery, hooks, targets, the masked-forward engine, map operations, results."""
