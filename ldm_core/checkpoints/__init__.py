"""What weights files hold: safe reading (no pickle code), splitting single-file checkpoints
into components, architecture detection from key layout and shapes, synthetic checkpoints
with the real layouts, and the embedded default model's file."""
