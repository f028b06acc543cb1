"""The node pack (`ldm_nodes`): thin typed adapters, one spec per node and one engine call each.

Imported as `ldm_nodes` everywhere: installed (`pip install` maps this folder to that name),
in tests, and inside ComfyUI (the pack's own __init__.py mounts it). Node modules reach the
engine with ordinary `from ldm_core... import ...` statements and never the reverse.
"""
