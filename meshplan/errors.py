"""Errors a user can cause, reported at the edge in one line that names the field and the fix.

The CLI turns :class:`InputError` into exit code 2 and :class:`NoFeasiblePlan` into exit code 3,
printing ``str(error)`` and no traceback.
"""

from __future__ import annotations


class MeshplanError(Exception):
    """Base class of every error meshplan reports to a user."""

    exit_code = 1


class InputError(MeshplanError, ValueError):
    """Bad input: a malformed file, an unknown name, an impossible value or pin.

    ``field`` is what the user wrote (``--fix tp``, ``model.hidden``, ``cluster.yaml: gpu.memory_gib``);
    ``fix`` says what to do instead.
    """

    exit_code = 2

    def __init__(self, field: str, problem: str, fix: str = ""):
        self.field, self.problem, self.fix = field, problem, fix
        text = f"{field}: {problem}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)

    def __reduce__(self):
        """Rebuilt from its three parts (an error raised in a worker process reaches the parent whole)."""
        return type(self), (self.field, self.problem, self.fix)


class NoFeasiblePlan(MeshplanError):
    """The search found no configuration that fits; the message says what would."""

    exit_code = 3
