"""Known warnings from the dependencies that a PERFT user cannot act on, filtered by exact message and origin.

Each entry is one warning, matched on its category, the start of its text and the module that raises it, so that
nothing else is hidden. Some dependencies report through `logging` instead of `warnings`; those entries are matched on
the logger's name and the message. `quiet_known_dependency_warnings` runs when peft_perft is imported, before peft,
because importing peft imports torchao (when installed), which logs at import time.
"""

from __future__ import annotations

import logging
import re
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


# (logger name, message regex, why it is safe to hide)
KNOWN_LOG_RECORDS: tuple[tuple[str, str, str], ...] = (
    (
        "torchao",
        r"Failed to load .*torchao/_C_\w+.*\.so",
        "torchao 0.18's wheel ships CUDA and other-Python kernels that cannot load on a CPU build; torchao's CPU "
        "paths (what PERFT's int8-experts base uses) work without them",
    ),
    (
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "bitsandbytes 0.50 on a CPU with AVX512-BF16 asks the Hugging Face Hub for an optional kernel at import time "
        "(offline, or its publisher unverified, it fails) and falls back to its own CPU kernel, which computes the "
        "same 4-bit product",
    ),
    (
        "torch.utils._pytree",
        r"<enum '\w+'> is an Enum subclass and is now natively supported by torch.compile",
        "torchao 0.18 registers its enums the way torch 2.13 deprecates; torchao must change, not the user",
    ),
)


class _KnownRecordFilter(logging.Filter):
    """Drops the log records of one logger whose message matches a known, harmless pattern."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_dependency_warnings() -> None:
    """Filter each entry of `KNOWN_WARNINGS` and `KNOWN_LOG_RECORDS`; calling it again adds nothing."""
    for category, message, module, _reason in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for logger_name, pattern, _reason in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _KnownRecordFilter) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_KnownRecordFilter(pattern))
