"""Text before the encoder: CLIP's byte-level BPE tokenizer and ComfyUI's prompt syntax
(weights, textual-inversion embeddings, 77-token chunks)."""
