"""Fine-tune an MoE model with PERFT on an LLM-Adapters dataset (commonsense_170k, math_50k, ...) with TRL.

    python examples/sft_perft.py \\
        --model_name_or_path allenai/OLMoE-1B-7B-0924 \\
        --dataset_path ft-training_set/commonsense_170k.json \\
        --perft_variant R --perft_r 8 --perft_num_experts 8 --perft_top_k 2 \\
        --output_dir olmoe-perft-r-top2of8-r8

Defaults follow the PERFT paper: learning rate 1e-5 on OLMoE and 2e-5 on Mixtral (other models keep TRL's
default unless ``--learning_rate`` is given), ``lora_alpha = 2 r``, dropout 0.05, 3 epochs, a 256-token cutoff.
Every PerftConfig option is a ``--perft_<option>`` flag; every SFTConfig and TRL ModelConfig flag works too, and
so does ``--config run.yaml`` (command-line flags win over the file, the file over these defaults). Prompts are
the Alpaca-style ones `peft-perft eval` uses, so training and evaluation match. Routing statistics go to the
Trainer's logs and heatmaps to ``<output_dir>/routing`` unless ``--routing_monitor false``.
Multi-GPU: see examples/accelerate/README.md. Models too big for one device can be sharded by Transformers at load
time instead (``--tp_size``, ``--ep_size``, ``--fsdp_size``, ``--ep_implementation perft``), launched with torchrun:
see docs/big_models.md.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from datasets import Dataset, load_dataset
from transformers import AutoConfig, set_seed
from transformers.distributed import DistributedConfig
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from peft_perft import PerftConfig
from peft_perft.evaluation import build_prompt
from peft_perft.monitor import add_routing_monitor

PAPER_LEARNING_RATES = {"olmoe": 1e-5, "mixtral": 2e-5}
# bf16 only on a GPU: SFTConfig's own default turns it on, which Transformers refuses on a CPU.
PAPER_DEFAULTS = {"num_train_epochs": 3, "max_length": 256, "dtype": "auto", "bf16": torch.cuda.is_available()}
FLAG_PREFIX = "perft_"
JSON_OPTIONS = ("target_experts", "rank_pattern")
"""PerftConfig options given on the command line as JSON (a mapping per MoE block)."""


@dataclass
class ScriptArguments:
    """The training data: a dataset in the LLM-Adapters format (instruction, input, output)."""

    dataset_path: str = field(
        metadata={"help": "LLM-Adapters JSON/JSONL file (e.g. ft-training_set/math_50k.json) or a Hub dataset id."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on when loading from the Hub."})
    val_set_size: int = field(default=0, metadata={"help": "Examples held out for evaluation (0: none)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N examples only."})
    routing_monitor: bool = field(default=True, metadata={"help": "Log routing statistics and draw heatmaps."})
    routing_per_layer: bool = field(default=False, metadata={"help": "Log every layer's routing scalars too."})


@dataclass
class ShardingArguments:
    """Transformers' parallelism applied at load time (``from_pretrained(distributed_config=...)``), for torchrun.

    Leave them at 1 to let Accelerate place the model (DDP, FSDP2, ZeRO-3: examples/accelerate)."""

    tp_size: int = field(default=1, metadata={"help": "Tensor-parallel ranks (each holds 1/tp of every expert)."})
    ep_size: int = field(default=1, metadata={"help": "Expert-parallel ranks (each holds 1/ep of the experts)."})
    fsdp_size: int = field(default=1, metadata={"help": "Data-parallel ranks that shard the weights (FSDP)."})
    ep_implementation: str | None = field(
        default=None, metadata={"help": "'perft' to shard PERFT-E like the experts under expert parallelism."}
    )

    def distributed_config(self) -> DistributedConfig | None:
        """The DistributedConfig these flags describe; None when they ask for no sharding at load."""
        sizes = {"tp_size": self.tp_size, "ep_size": self.ep_size, "fsdp_size": self.fsdp_size}
        if all(size == 1 for size in sizes.values()) and self.ep_implementation is None:
            return None
        extra = {} if self.ep_implementation is None else {"ep_implementation": self.ep_implementation}
        return DistributedConfig(**sizes, **extra)


@dataclass
class PerftArguments:
    """Every PerftConfig option as a ``--perft_<option>`` flag (see peft_perft.PerftConfig for their meaning)."""

    perft_variant: Literal["R", "E", "D", "S"] = field(default="R", metadata={"help": "PERFT variant."})
    perft_r: int = field(default=8, metadata={"help": "Bottleneck rank of each adapter expert."})
    perft_lora_alpha: float | None = field(default=None, metadata={"help": "Scaling numerator (default: 2 r)."})
    perft_lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    perft_adapter_type: Literal["lora", "parallel_adapter"] = field(
        default="lora", metadata={"help": "Linear ('lora') or SiLU ('parallel_adapter') bottleneck."}
    )
    perft_num_experts: int | None = field(default=None, metadata={"help": "Adapter experts per block."})
    perft_top_k: int | None = field(default=None, metadata={"help": "PERFT-R: adapter experts per token."})
    perft_normalize_top_k: bool = field(default=True, metadata={"help": "PERFT-R: renormalise top-k weights."})
    perft_router_aux_loss_coef: float = field(default=0.01, metadata={"help": "PERFT-R: load-balancing weight."})
    perft_router_init_std: float = field(default=0.02, metadata={"help": "PERFT-R: router init std."})
    perft_dispatch_backend: str = field(default="auto", metadata={"help": "Routed-expert kernel."})
    perft_init_weights: bool = field(default=True, metadata={"help": "B = 0 at init (the adapter starts as a no-op)."})
    perft_target_modules: list[str] | None = field(default=None, metadata={"help": "MoE blocks to adapt."})
    perft_exclude_modules: list[str] | None = field(default=None, metadata={"help": "Modules never to adapt."})
    perft_layers_to_transform: list[int] | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    perft_layers_pattern: list[str] | None = field(default=None, metadata={"help": "Name of the layer list."})
    perft_modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train."})
    perft_trainable_token_indices: list[int] | None = field(
        default=None, metadata={"help": "Token ids whose embeddings are trained."}
    )

    perft_target_experts: str | None = field(
        default=None,
        metadata={"help": 'Selective PERFT-E, as JSON: {"model.layers.0.mlp": [0, 3], ...} (peft_perft.selection).'},
    )
    perft_target_experts_source: str | None = field(
        default=None, metadata={"help": "How --perft_target_experts was chosen (shown on the model card)."}
    )
    perft_rank_pattern: str | None = field(
        default=None, metadata={"help": 'A rank per MoE block, as JSON: {"model.layers.0.mlp": 16, ...}.'}
    )

    def to_config(self) -> PerftConfig:
        """The PerftConfig these flags describe, with the paper's lora_alpha = 2 r when none is given."""
        options = {item.name.removeprefix(FLAG_PREFIX): getattr(self, item.name) for item in fields(self)}
        for name in JSON_OPTIONS:
            if isinstance(options[name], str):
                options[name] = json.loads(options[name])
        if options["lora_alpha"] is None:
            options["lora_alpha"] = 2 * options["r"]
        return PerftConfig(task_type="CAUSAL_LM", **options)


def parse_arguments(
    argv: Sequence[str] | None = None,
) -> tuple[ScriptArguments, PerftArguments, ShardingArguments, SFTConfig, ModelConfig]:
    """Parse flags (and ``--config``), with the paper's defaults and the paper's learning rate for the model family.

    A model sharded at load time saves its checkpoints without the optimizer (``save_only_model``): Transformers
    cannot checkpoint the optimizer of such a model."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((ScriptArguments, PerftArguments, ShardingArguments, SFTConfig, ModelConfig))
    parser.set_defaults(**PAPER_DEFAULTS)
    _, _, sharding_args, training_args, model_args = parser.parse_args_and_config(argv)
    learning_rate = PAPER_LEARNING_RATES.get(_model_type(model_args, training_args))
    if learning_rate is not None:
        parser.set_defaults(learning_rate=learning_rate)
    if sharding_args.distributed_config() is not None:
        parser.set_defaults(save_only_model=True)
    script_args, perft_args, sharding_args, training_args, model_args = parser.parse_args_and_config(argv)
    _refuse_other_adapters(model_args)
    return script_args, perft_args, sharding_args, training_args, model_args


def _model_type(model_args: ModelConfig, training_args: SFTConfig) -> str | None:
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: the MoE model (Hub id or local folder) to fine-tune.")
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    return getattr(config, "model_type", None)


def _refuse_other_adapters(model_args: ModelConfig) -> None:
    """TRL's LoRA and quantisation flags would silently do nothing here; say so instead."""
    if model_args.use_peft:
        raise ValueError("--use_peft configures a LoRA adapter; this script trains PERFT: use the --perft_* flags.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("--load_in_4bit/--load_in_8bit are not supported with PERFT in this script; drop them.")


def load_llm_adapters_dataset(script_args: ScriptArguments) -> Dataset:
    """Records with instruction/input/output, mapped to the evaluation prompt and the expected output."""
    path = Path(script_args.dataset_path)
    if path.is_file():
        dataset = load_dataset("json", data_files=str(path), split="train")
    else:
        dataset = load_dataset(script_args.dataset_path, split=script_args.dataset_split)
    missing = {"instruction", "output"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"{script_args.dataset_path} is not in the LLM-Adapters format: it lacks {sorted(missing)} (columns: "
            f"{dataset.column_names}). Each record needs 'instruction', 'output' and optionally 'input'."
        )
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    return dataset.map(_prompt_and_completion, remove_columns=dataset.column_names)


def _prompt_and_completion(record: dict[str, Any]) -> dict[str, str]:
    return {"prompt": build_prompt(record), "completion": record["output"]}


def main(argv: Sequence[str] | None = None) -> SFTTrainer:
    script_args, perft_args, sharding_args, training_args, model_args = parse_arguments(argv)
    # Every process must build the same adapter: FSDP and ZeRO-3 shard it without broadcasting it first.
    set_seed(training_args.seed)
    dataset = load_llm_adapters_dataset(script_args)
    eval_dataset = None
    if script_args.val_set_size > 0:
        splits = dataset.train_test_split(test_size=script_args.val_set_size, seed=training_args.seed)
        dataset, eval_dataset = splits["train"], splits["test"]
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    distributed_config = sharding_args.distributed_config()
    if distributed_config is not None:
        # Transformers places each shard on its rank's device; TRL's default device_map="auto" would conflict.
        training_args.model_init_kwargs.update(distributed_config=distributed_config, device_map=None)
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        peft_config=perft_args.to_config(),
    )
    if script_args.routing_monitor:
        add_routing_monitor(trainer, per_layer=script_args.routing_per_layer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


def end(accelerator: Accelerator) -> None:
    """Close the trackers and the process group once the model is gone: torch 2.13 with gloo can hang at exit when
    a model outlives its process group."""
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    end(main().accelerator)
