"""LoRA and its relatives: the names LoRA files give to our weights, and weight patches
carried by a model view, merged only while it runs."""
