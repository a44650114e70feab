"""What the bench's parent process and its case processes share (stdlib only, so the parent can
import it without torch): the marker of a result line, and what counts as running out of memory."""

from __future__ import annotations

RESULT_MARK = "@@PREFLOSS-BENCH-RESULT@@ "


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure (Python's, glibc's under RLIMIT_DATA, or torch's)."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc)
