"""PERFT: Parameter-Efficient Routed Fine-Tuning for Mixture-of-Experts models, as a PEFT method.

Importing this package registers ``PeftType.PERFT`` with peft, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` handle PERFT adapters.
"""

from .dependency_warnings import quiet_known_dependency_warnings

quiet_known_dependency_warnings()  # before peft: importing peft imports torchao, which logs harmless noise

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.utils import register_peft_method  # noqa: E402

from .config import PerftConfig, perft_peft_type  # noqa: E402
from .hub import install_hub_hooks  # noqa: E402
from .layer import PerftMoeBlock  # noqa: E402
from .loading import install_loading_guard  # noqa: E402
from .model import PerftModel  # noqa: E402
from .parallel import install_sharding_hooks  # noqa: E402

__all__ = ["PerftConfig", "PerftModel", "PerftMoeBlock", "__version__"]
__version__ = "0.1.0"

if perft_peft_type() in PEFT_TYPE_TO_TUNER_MAPPING:
    # A re-import (importlib.reload): point peft at the fresh classes instead of registering twice.
    PEFT_TYPE_TO_CONFIG_MAPPING[perft_peft_type()] = PerftConfig
    PEFT_TYPE_TO_TUNER_MAPPING[perft_peft_type()] = PerftModel
    PEFT_TYPE_TO_PREFIX_MAPPING[perft_peft_type()] = PerftModel.prefix
else:
    register_peft_method(name="perft", config_cls=PerftConfig, model_cls=PerftModel, prefix=PerftModel.prefix)
install_loading_guard()
install_hub_hooks()
install_sharding_hooks()
