"""Graph runtime: load saved workflows, validate them, and run them headless.

    prompt = load_workflow("workflow.json", registry)    # API or UI format, JSON or PNG
    issues = validate(prompt, registry, context)          # every problem, with codes
    result = Executor(registry, cache).run(prompt, context)

Imports neither torch nor any engine module: node types come in as a registry
(`Mapping[str, NodeSpec]`), caches are owned by the caller.
"""
from .cache import NodeOutputs, OutputCache
from .errors import ExecutionFailed, NodeExecutionError, ValidationError, ValidationIssue, WorkflowError
from .execute import Executor, Hooks, NodeProgress, RunResult
from .prompt import Link, Prompt, PromptNode, as_prompt, parse_api, to_api
from .spec import InputSpec, NodeSpec, OutputSpec
from .validate import check, validate
from .workflow import detect_format, load_workflow, read_image_workflow

__all__ = [
    "Executor", "ExecutionFailed", "Hooks", "InputSpec", "Link", "NodeExecutionError", "NodeOutputs", "NodeProgress",
    "NodeSpec", "OutputCache", "OutputSpec", "Prompt", "PromptNode", "RunResult", "ValidationError",
    "ValidationIssue", "WorkflowError", "as_prompt", "check", "detect_format", "load_workflow", "parse_api",
    "read_image_workflow", "to_api", "validate",
]
