"""PERFT: Parameter-Efficient Routed Fine-Tuning for Mixture-of-Experts models, as a PEFT method.

Importing this package registers ``PeftType.PERFT`` with peft, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` handle PERFT adapters; `peft_perft.patches` lists
everything the import changes in peft and Transformers.
"""

from .dependency_warnings import quiet_known_dependency_warnings

quiet_known_dependency_warnings()  # before peft: importing peft imports torchao, which logs harmless noise

from . import patches  # noqa: E402
from .config import PerftConfig  # noqa: E402
from .layer import PerftMoeBlock  # noqa: E402
from .model import PerftModel  # noqa: E402

__all__ = ["PerftConfig", "PerftModel", "PerftMoeBlock", "__version__"]
__version__ = "0.1.0"

patches.install()
