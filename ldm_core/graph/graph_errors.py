"""Typed errors of the graph runtime: one per stage (load, validate, run).

Each stage reports everything it can about a workflow before giving up, so a person fixes
a file once rather than once per error: validation collects every issue, a run finishes
every branch that does not depend on a failed node.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ldm_core.errors import LdmError

if TYPE_CHECKING:  # pragma: no cover
    from ldm_core.graph.execute import RunResult

Severity = Literal["error", "warning"]


class WorkflowError(LdmError, ValueError):
    """A workflow file or object is malformed: not JSON, not a known format, a link record
    that cannot be read, a subgraph this runtime does not support yet.

    `where` locates the problem inside the document ("nodes[3].inputs[1]"), when known.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class ValidationIssue:
    """One problem found in a prompt before running it (a record, not an exception).

    `code` is stable (tests and tools match on it); `message` says what to do.
    `node_id`/`class_type` are None for problems of the whole prompt (no output node).
    Warnings never stop a run: extra inputs a node type does not have, and problems in
    nodes that no requested output depends on.
    """

    code: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    input_name: str | None = None
    severity: Severity = "error"

    def __str__(self) -> str:
        where = "prompt"
        if self.node_id is not None:
            where = f"node {self.node_id}" + (f" ({self.class_type})" if self.class_type else "")
        if self.input_name is not None:
            where += f", input '{self.input_name}'"
        return f"{self.severity}: {where} [{self.code}]: {self.message}"


class ValidationError(LdmError, ValueError):
    """A prompt cannot run. Holds every issue found (errors and warnings); str() is a report."""

    def __init__(self, issues: Iterable[ValidationIssue]) -> None:
        self.issues: tuple[ValidationIssue, ...] = tuple(issues)
        super().__init__(self.report())

    @property
    def errors(self) -> list[ValidationIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[ValidationIssue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def codes(self) -> set[str]:
        return {i.code for i in self.errors}

    def report(self) -> str:
        n_err, n_warn = len(self.errors), len(self.warnings)
        head = f"workflow is invalid: {n_err} error{'s' * (n_err != 1)}"
        if n_warn:
            head += f", {n_warn} warning{'s' * (n_warn != 1)}"
        return "\n".join([head, *(f"  - {i}" for i in self.issues)])


class NodeExecutionError(LdmError):
    """A node raised (or returned something unusable) while running.

    The original exception is `__cause__` (and `original`), so its traceback is kept.
    """

    def __init__(self, node_id: str, class_type: str, message: str, title: str | None = None) -> None:
        self.node_id = node_id
        self.class_type = class_type
        self.title = title
        name = f"node {node_id} ({class_type}" + (f" '{title}'" if title and title != class_type else "") + ")"
        super().__init__(f"{name} failed: {message}")

    @property
    def original(self) -> BaseException | None:
        return self.__cause__


class ExecutionFailed(LdmError):
    """Raised at the end of a run in which nodes failed. Every other branch did run: the
    partial `result` is kept, and `failures` lists each NodeExecutionError."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.failures: Sequence[NodeExecutionError] = tuple(result.failed.values())
        super().__init__(result.report())
