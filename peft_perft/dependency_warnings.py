"""Known warnings from the dependencies that a PERFT user cannot act on, filtered by exact message and origin.

Each entry is one warning, matched on its category, the start of its text and the module that raises it, so that
nothing else is hidden. `quiet_known_dependency_warnings` runs when peft_perft is imported.
"""

from __future__ import annotations

import warnings

# (category, message regex, module regex of the warning's origin, why it is safe to hide)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        r"transformers\.modeling_utils",
        "peft 0.21 reads the alias Transformers 5.23 renamed, in every PeftModel(); peft must change, not the user",
    ),
)


def quiet_known_dependency_warnings() -> None:
    """Add an ignore filter for each entry of `KNOWN_WARNINGS` (idempotent: ``warnings`` drops duplicates)."""
    for category, message, module, _reason in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
