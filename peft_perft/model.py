"""`PerftModel`: the peft `BaseTuner` that finds MoE blocks, wraps them and adds PERFT-R's auxiliary loss."""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from . import parallel
from .architectures import MoeBlockSpec, find_moe_blocks
from .config import PerftConfig
from .dispatch import refusal
from .layer import MERGE_ERROR, PerftMoeBlock
from .loading import check_adapter_fits
from .quantization import keep_small_4bit_layers_unpacked


class PerftModel(BaseTuner):
    """Adds PERFT adapters to every (targeted) MoE block of a model; see `PerftConfig` for the variants."""

    prefix: str = "perft_"
    tuner_layer_cls = PerftMoeBlock
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: PerftConfig, model_config: dict) -> PerftConfig:
        """Keep ``target_modules=None``: it means every MoE block, found by structure in `_prepare_model`."""
        return peft_config

    def _prepare_model(self, peft_config: PerftConfig, model: nn.Module) -> None:
        """Find the MoE blocks once per adapter; a model without any gets an error that names its type."""
        parallel.refuse_unsupported_layout(model)
        keep_small_4bit_layers_unpacked(model)
        self._moe_blocks: dict[str, MoeBlockSpec] = find_moe_blocks(model)
        if not self._moe_blocks:
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ValueError(
                f"PERFT found no Mixture-of-Experts block in this {model_type!r} model (a router module beside an "
                f"experts module with 3-D expert weights). PERFT adapts MoE models only; for a dense model use "
                f"another PEFT method such as LoRA."
            )
        _check_block_names(peft_config, self._moe_blocks)
        parallel.prepare(model, self._experts_modules(model))

    def _experts_modules(self, model: nn.Module) -> list[nn.Module]:
        """The experts module of each MoE block found (inside PERFT's wrapper where an adapter is already there)."""
        modules = []
        for key, spec in self._moe_blocks.items():
            block = model.get_submodule(key)
            if isinstance(block, PerftMoeBlock):
                block = block.base_layer
            if spec.experts_name is not None:
                modules.append(spec.experts_module(block))
        return modules

    def _check_target_module_exists(self, peft_config: PerftConfig, key: str) -> Any:
        """Target only MoE blocks: all of them when target_modules is None, else those the patterns select."""
        if key not in self._moe_blocks:
            return False
        if peft_config.target_experts is not None and not peft_config.experts_for(key):
            return False  # selective PERFT-E: a block with no selected expert stays as it is
        if peft_config.target_modules is None:
            peft_config = _targeting_block(peft_config, key)
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(
        self,
        peft_config: PerftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        """Add the adapter to an existing PERFT wrapper, or wrap the MoE block; then let the distributed layouts
        place it (`parallel.place`: sharded with the experts, or replicated)."""
        if isinstance(target, PerftMoeBlock):
            target.update_layer(adapter_name, peft_config)
            parallel.place(target, adapter_name)
            return
        spec = self._moe_blocks.get(current_key)
        if spec is None:
            raise ValueError(f"Module {current_key!r} is not an MoE block; PERFT can only adapt MoE blocks.")
        new_module = PerftMoeBlock(target, adapter_name, peft_config, spec, block_name=current_key)
        parallel.place(new_module, adapter_name)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def init_perft_weights(self, adapter_name: str | None = None) -> None:
        """Initialise the adapter(s) as `get_peft_model` does on a real device, for a model prepared on meta.

        Call it once the base weights are real: after ``to_empty`` and loading them (FSDP2's flow, with or without
        ``fully_shard``), or after loading them with ``assign=True`` into a model built under Accelerate's
        ``init_empty_weights`` (adapter tensors still on meta then get memory on the base weights' device). Seed as
        before ``get_peft_model``: blocks and adapters draw in the order get_peft_model creates them, so the same
        random state gives the same adapter (sharded tensors keep their shard of rank 0's values)."""
        names = [adapter_name] if adapter_name is not None else list(self.peft_config)
        blocks = [module for module in self.model.modules() if isinstance(module, PerftMoeBlock)]
        on_meta = [block.block_name for block in blocks if any(p.is_meta for p in block.base_layer.parameters())]
        if on_meta:
            raise RuntimeError(
                f"init_perft_weights found base weights still on the meta device in {len(on_meta)} PERFT block(s), "
                f"the first {on_meta[0]!r}: materialise the model first (model.to_empty(device=...), then load the "
                f"base weights), then initialise the adapter."
            )
        for name in names:
            for block in blocks:
                if name in block.perft_A:
                    _materialise_adapter(block, name)
                    block.reset_parameters(name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's cast of the new adapter (PeftModel calls it after injecting it); then, the adapter's dtype now
        final, refuse a dispatch backend named in its config that can never run it, before any step."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for module in self.model.modules():
            if isinstance(module, PerftMoeBlock) and adapter_name in module.perft_A:
                _refuse_unrunnable_backend(module, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PerftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model (peft's way), then refuse an adapter that does not fit before loading."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_fits(model, adapter_name, remapped)
        return parallel.distribute_adapter_state_dict(model, remapped)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put a module in place; used by unload() to restore the original block, without PERFT's experts hook."""
        if isinstance(child, PerftMoeBlock):
            parallel.release(child)  # first: the TP wrapper may wrap the forward the experts hook installed
            child.remove_experts_hook()
        setattr(parent, child_name, new_module)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError(MERGE_ERROR)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's injection (new, added or loaded adapters alike), then one warning for the whole model where a
        selective PERFT-E adapter leaves the expert-parallel ranks unequal (`parallel.warn_uneven_selection`)."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if self.peft_config[adapter_name].target_experts:
            parallel.warn_uneven_selection(model, adapter_name)

    def _post_injection_hook(self, model: nn.Module, config: PerftConfig, adapter_name: str) -> None:
        """Attach the aux-loss hook to the model itself, so every call path (PeftModel, TRL, direct) gets it; on a
        model sharded at load time, make the new adapter replicated with averaged gradients (see
        `parallel.replication`)."""
        if getattr(self, "_aux_loss_hook", None) is None:
            self._aux_loss_hook = model.register_forward_hook(self._add_router_aux_loss, with_kwargs=True)
        parallel.replicate_adapter(model)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Remove the aux-loss hook along with the adapters, so the returned model is the original one."""
        if getattr(self, "_aux_loss_hook", None) is not None:
            self._aux_loss_hook.remove()
            self._aux_loss_hook = None
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _add_router_aux_loss(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        """When the model computed its router aux loss, add PERFT-R's weighted one to both loss paths.

        ``outputs.loss`` gets it directly. Trainers that build their own loss as ``lm + coef * outputs.aux_loss``
        (TRL's SFTTrainer) get it through ``aux_loss``, which carries PERFT's term divided by the model's ``coef``.
        The term itself is exposed as the attribute ``outputs.perft_aux_loss`` (not as a new output key, which would
        break code that rebuilds outputs from their fields, such as DDP).
        """
        base_aux_loss = getattr(outputs, "aux_loss", None)
        if base_aux_loss is None or (getattr(outputs, "loss", None) is None and not torch.is_grad_enabled()):
            return outputs
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        perft_aux_loss = self.router_aux_loss(attention_mask)
        if perft_aux_loss is None:
            return outputs
        outputs.perft_aux_loss = perft_aux_loss
        if getattr(outputs, "loss", None) is not None:
            outputs["loss"] = outputs.loss + perft_aux_loss.to(outputs.loss.dtype)
        base_coef = getattr(_text_config(module), "router_aux_loss_coef", 0.0)
        if base_coef:
            outputs["aux_loss"] = base_aux_loss + perft_aux_loss.to(base_aux_loss.dtype) / base_coef
        return outputs

    def router_aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Weighted Switch load-balancing loss of every active PERFT-R router over its last forward.

        For each adapter, N * sum_i f_i P_i over the non-padding tokens of all adapted layers, where f_i is the
        fraction of tokens sent to expert i and P_i its mean router probability; then times the adapter's
        ``router_aux_loss_coef``. None when no PERFT-R adapter is active.
        """
        total = None
        for name in self.active_adapters:
            config = self.peft_config[name]
            if not config.has_own_router:
                continue
            records = [m.routing_records[name] for m in self.model.modules() if _has_record(m, name)]
            if not records:
                continue
            loss = config.router_aux_loss_coef * _switch_loss(records, attention_mask)
            total = loss if total is None else total + loss
        return total


def _check_block_names(config: PerftConfig, moe_blocks: dict[str, MoeBlockSpec]) -> None:
    """``target_experts`` and ``rank_pattern`` name real MoE blocks; selective PERFT-E names experts they have and
    selects at least one expert."""
    for field_name in ("target_experts", "rank_pattern"):
        unknown = sorted(set(getattr(config, field_name) or {}) - set(moe_blocks))
        if unknown:
            raise ValueError(
                f"PerftConfig.{field_name} names {unknown}, which are not MoE blocks of this model. Its MoE blocks "
                f"are {sorted(moe_blocks)[:4]}{' ...' if len(moe_blocks) > 4 else ''} ({len(moe_blocks)} in all): "
                f"key {field_name} by those module names (peft_perft.selection writes them for you)."
            )
    if config.target_experts is None:
        return
    for block_name, experts in config.target_experts.items():
        count = moe_blocks[block_name].num_experts
        outside = [index for index in experts if index >= count]
        if outside:
            raise ValueError(
                f"PerftConfig.target_experts[{block_name!r}] selects experts {outside}, but that block has "
                f"{count} experts (indices 0 to {count - 1}). Select experts of the block, or check that the "
                f"selection was measured on this base model."
            )
    if not any(config.target_experts.values()):
        raise ValueError(
            "PerftConfig.target_experts selects no expert in any block, so PERFT-E would add nothing. Select at "
            "least one expert, or set target_experts=None to adapt them all."
        )


def _materialise_adapter(block: PerftMoeBlock, adapter_name: str) -> None:
    """Give the adapter's tensors that are still on meta (uninitialised) memory on the base weights' device."""
    device = next(block.base_layer.parameters()).device
    for tensors in (block.perft_A, block.perft_B, block.perft_router):
        parameter = tensors.get(adapter_name)
        if parameter is not None and parameter.is_meta:
            tensors[adapter_name] = nn.Parameter(torch.empty_like(parameter, device=device), parameter.requires_grad)


def _refuse_unrunnable_backend(block: PerftMoeBlock, adapter_name: str) -> None:
    """A ValueError naming the block and the rule where the configured dispatch backend cannot run this adapter."""
    config = block.perft_configs[adapter_name]
    if not config.is_routed:  # D and S compute all their experts with two matmuls, no backend
        return
    reason = refusal(config.dispatch_backend, block.spec.hidden_size, block.perft_A[adapter_name].dtype)
    if reason is not None:
        raise ValueError(
            f"PerftConfig(dispatch_backend={config.dispatch_backend!r}) cannot run PERFT-{config.variant} adapter "
            f"{adapter_name!r} in block {block.block_name!r}: {reason}. Use dispatch_backend='auto', which falls "
            f"back to a backend that can."
        )


def _text_config(model: nn.Module) -> Any:
    """The language-model part of the model's config (multimodal models nest it)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _has_record(module: nn.Module, adapter_name: str) -> bool:
    return isinstance(module, PerftMoeBlock) and adapter_name in module.routing_records


def _switch_loss(records: list, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """N * sum_i f_i P_i with f and P averaged over the non-padding tokens of every layer together."""
    probs = torch.cat([record.router_probs for record in records])
    index = torch.cat([record.expert_index for record in records])
    num_experts = probs.shape[-1]
    dispatched = torch.zeros_like(probs).scatter_(1, index, 1.0)
    token_weight = _token_weights(attention_mask, records, probs)
    denominator = token_weight.sum().clamp_min(1.0)
    fraction = (dispatched * token_weight).sum(0) / denominator
    mean_prob = (probs * token_weight).sum(0) / denominator
    return num_experts * (fraction * mean_prob).sum()


def _token_weights(attention_mask: torch.Tensor | None, records: list, probs: torch.Tensor) -> torch.Tensor:
    """1 for real tokens, 0 for padding; all ones when the mask does not line up with the recorded tokens."""
    tokens_per_layer = records[0].expert_index.shape[0]
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != tokens_per_layer:
        return torch.ones(probs.shape[0], 1, device=probs.device, dtype=probs.dtype)
    mask = attention_mask.reshape(-1, 1).to(device=probs.device, dtype=probs.dtype)
    return mask.repeat(len(records), 1)


def _targeting_block(peft_config: PerftConfig, key: str) -> PerftConfig:
    """A copy of the config that targets this block by its attribute name, so that peft's layer and exclusion
    filters (layers_to_transform, exclude_modules) still apply."""
    selected = copy.copy(peft_config)
    selected.target_modules = [key.rpartition(".")[2]]
    return selected
