"""The embedded model's lab: procedural scenes with ground truth, the procedural object
detector, adherence scoring and training. Never imported by the inference engine or the
nodes (enforced by the import contracts in pyproject.toml)."""
