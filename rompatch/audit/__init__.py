"""What else does a patch change? ``audit_patch`` measures where a patch fires (its reach over a
text), what it changes (behavioural probes before and after) and general text (perplexity), and
gives a pass/warn verdict (``Thresholds``).

Data flow: ``reach`` (keys, reach scan) → ``probes`` (prompts measured before and after) →
``report`` (numbers, verdict, text, the ``audit`` key inside a patch file); ``run`` ties them.
"""

from .report import AuditReport, Thresholds, attach_audit, render, saved_audit, summary_line
from .run import DEFAULT_AUDIT_TOKENS, audit_patch

__all__ = [
    "DEFAULT_AUDIT_TOKENS",
    "AuditReport",
    "Thresholds",
    "attach_audit",
    "audit_patch",
    "render",
    "saved_audit",
    "summary_line",
]
