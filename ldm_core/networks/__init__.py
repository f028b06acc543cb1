"""The networks: torch modules whose attribute paths mirror checkpoint keys, their frozen
configs and named presets, and the key tables of the CLIP text tower. No file I/O beyond
strict state-dict loading."""
