"""The run config tree: its sections, the embedded run, the placement plan and the checks made before start."""
