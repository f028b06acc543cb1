"""Graph runtime: load saved workflows, validate them, and run them headless.

    prompt = load_workflow("workflow.json", registry)    # API or UI format, JSON or PNG
    issues = validate(prompt, registry, context)          # every problem, with codes
    result = Executor(registry, cache).run(prompt, context)

Imports neither torch nor any engine module: node types come in as a registry
(`Mapping[str, NodeSpec]`), caches are owned by the caller.
"""
from ldm_core.graph.cache import NodeOutputs, OutputCache
from ldm_core.graph.execute import Executor, Hooks, NodeProgress, RunResult
from ldm_core.graph.graph_errors import (
    ExecutionFailed,
    NodeExecutionError,
    ValidationError,
    ValidationIssue,
    WorkflowError,
)
from ldm_core.graph.prompt_graph import Link, Prompt, PromptNode, as_prompt, parse_api, to_api
from ldm_core.graph.spec import InputSpec, NodeSpec, OutputSpec
from ldm_core.graph.validate import check, validate
from ldm_core.graph.workflow import detect_format, load_workflow, read_image_workflow

__all__ = [
    "Executor", "ExecutionFailed", "Hooks", "InputSpec", "Link", "NodeExecutionError", "NodeOutputs", "NodeProgress",
    "NodeSpec", "OutputCache", "OutputSpec", "Prompt", "PromptNode", "RunResult", "ValidationError",
    "ValidationIssue", "WorkflowError", "as_prompt", "check", "detect_format", "load_workflow", "parse_api",
    "read_image_workflow", "to_api", "validate",
]
