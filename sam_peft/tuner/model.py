"""`SparseDiffModel`: the peft tuner that wraps every targeted module in a sparse-delta layer."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..errors import ConfigError, DeltaFileError
from ..parallel.collectives import is_sharded
from ..storage.encoding import ADAPTER_KEYS, decode_tensors
from ..storage.identity import BaseIdentity, architecture_of, check_same_base, shapes_digest, weights_fingerprint
from ..storage.keys import delta_key, is_delta_key
from ..storage.validation import check_dense_tensors, check_entries, index_dtype
from .combine import Combination
from .config import SparseDiffConfig
from .install import add_combined, select_data_free, sync_trainable
from .layer import SparseDiffLayer, keeps_running_statistics, own_parameters
from .mixed import BASE, MixedBatch, refuse_unsupported_arguments
from .peft_type import PREFIX
from .quantized_layers import DenseWeights, check_supported, quantization_record
from .targets import targets
from .weight_layers import layer_class_for

logger = logging.getLogger(__name__)


class SparseDiffModel(BaseTuner):
    """Sparse fine-tuning: a sparse delta (indices + values) on each targeted parameter of the base model.

    Created by `peft.get_peft_model(model, SparseDiffConfig(...))` after `import sam_peft`.
    """

    prefix: str = PREFIX
    tuner_layer_cls = SparseDiffLayer
    target_module_mapping: dict = {}

    # ----------------------------------------------------------------- targeting
    def _prepare_adapter_config(self, peft_config: SparseDiffConfig, model_config: dict) -> SparseDiffConfig:
        return peft_config  # target_modules=None means "every parameter except the head"

    def _prepare_model(self, peft_config: SparseDiffConfig, model: nn.Module) -> None:
        self._candidates, self._shared = candidate_modules(model)
        self._output_heads = output_head_names(model)
        _check_patterns_match(peft_config, sorted(self._candidates))
        self._save_running_statistics_densely(peft_config, model)
        _check_no_overlap_with_modules_to_save(peft_config, sorted(self._candidates))
        # quantized kernels without a dequantize path (GPTQ, AWQ, ...) are refused before anything is wrapped
        check_supported([(name, module) for name, module in model.named_modules()
                         if name and not isinstance(module, BaseTunerLayer) and self._targets(peft_config, name)])

    def _save_running_statistics_densely(self, peft_config: SparseDiffConfig, model: nn.Module) -> None:
        """Normalization layers with running statistics (BatchNorm) are not tuned sparsely: training in train mode
        moves their running mean and variance, which a delta does not carry (the saved adapter would not give the
        trained model back). By default they join `modules_to_save` (trained densely, statistics saved with them),
        with a warning; naming them in `target_modules` is refused."""
        found = []
        for name in sorted(self._candidates):
            module = model.get_submodule(name)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if keeps_running_statistics(base) and self._targets(peft_config, name):
                found.append(name)
        if not found:
            return
        listed = found[:5] + ([f"... ({len(found)} in all)"] if len(found) > 5 else [])
        if peft_config.target_modules is not None:
            raise ConfigError(
                f"target_modules matches normalization layers with running statistics: {listed}. Training in train "
                "mode updates their running mean and variance, which a sparse delta does not carry. Leave them out "
                "(exclude_modules), or train them densely by naming them in modules_to_save."
            )
        logger.warning(
            "%d normalization layers keep running statistics (BatchNorm), which training updates outside a sparse "
            "delta: they are trained densely and saved whole (added to modules_to_save) instead of tuned "
            "sparsely: %s. Name them in exclude_modules to freeze them.", len(found), listed)
        peft_config.modules_to_save = [*(peft_config.modules_to_save or ()), *found]

    def _check_target_module_exists(self, peft_config: SparseDiffConfig, key: str):
        if key not in self._candidates:
            return False
        return self._targets(peft_config, key)

    def _targets(self, peft_config: SparseDiffConfig, key: str) -> bool:
        """Whether the config targets module `key`, were it a candidate (see `candidate_modules`)."""
        if peft_config.target_modules is None:
            if key in self._output_heads:
                return False  # trainers read the output head's weight directly (e.g. TRL's fused log-probs)
            if saved_densely(peft_config, key):
                return False  # peft wraps it in a ModulesToSaveWrapper (a suffix match, e.g. "pre_classifier")
            catch_all = SimpleNamespace(
                exclude_modules=peft_config.exclude_modules, modules_to_save=peft_config.modules_to_save,
                target_modules=".*", target_parameters=None, layers_to_transform=None, layers_pattern=None,
            )
            return check_target_module_exists(catch_all, key)
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, SparseDiffLayer):
            target.update_layer(adapter_name, peft_config)
            return
        skip = frozenset(n for n, p in own_parameters(target).items() if id(p) in self._shared)
        new_module = layer_class_for(target)(target, adapter_name, peft_config, module_key=current_key, skip=skip)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        base = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        device = next(iter(base.parameters()), torch.empty(0)).device
        if device.type != "meta":
            for name, module in new_module.named_modules():
                # with low_cpu_mem_usage the new values live on the meta device until the load fills them
                if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                    module.to(device)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        check_base_identity(self, config, adapter_name)
        if not config.is_selected and config.is_data_free:
            select_data_free(self, adapter_name)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for adapter_name in self.peft_config:
            sync_trainable(self, adapter_name)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """peft enters this around every forward and `generate` of the PeftModel: a training forward of an adapter
        whose data-driven selection has not run is refused (it would tune the placeholder entries), and
        `adapter_names` (one adapter per row) reaches every layer."""
        refuse_unsupported_arguments(kwargs)
        if self.training and torch.is_grad_enabled():
            self._refuse_unselected_training()
        names = kwargs.get("adapter_names")
        if names is None:
            yield
            return
        with adapter_names_hooks(self.model, set(self.peft_config), names, kwargs):
            yield

    def _refuse_unselected_training(self) -> None:
        for name in self.active_adapters:
            config = self.peft_config[name]
            if config.is_selected or config.inference_mode:
                continue
            if any(not t.layer.disable_adapters and t.values.requires_grad for t in targets(self, name)):
                config.require_selected(name, "training it")

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for name in self.peft_config:
            sync_trainable(self, name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", density: float | None = None,
                             majority_sign_method: str = "total", seed: int = 0) -> None:
        """Add `adapter_name`, a combination of selected sam-peft adapters over the union of their entries.

        `combination_type`: "linear" (Σ w_j Δ_j), "ties" (trim each delta to its `density` fraction of largest
        entries, elect signs by `majority_sign_method`, average the agreeing weighted entries) or "dare_linear"
        (keep each entry with probability `density`, seeded by `seed`, rescale, sum). The new adapter saves and
        reloads like any other; its config's `combined_from` records the sources. It is not made active.
        """
        add_combined(self, adapter_name, Combination(tuple(adapters), tuple(weights), combination_type, density,
                                                     majority_sign_method, seed))

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=False)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self._check_merge(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=False,
                                                    adapter_names=adapter_names)

    def _check_merge(self, adapter_names: list[str] | None) -> None:
        """Check every layer before changing any, so a refused safe merge leaves the whole model unchanged."""
        for module in self.model.modules():
            if isinstance(module, SparseDiffLayer):
                module.check_merge(adapter_names if adapter_names is not None else module.active_adapters)

    # ----------------------------------------------------------------- saving
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """peft's selection of the adapter's entries, with FSDP2 shards gathered into full tensors.

        peft computes the state dict on every rank (only the main process writes it), so each DTensor among the
        adapter's entries and the dense head (`modules_to_save`) is all-gathered here, in the same order on every
        rank; the base weights are left sharded (they are not saved).
        """
        config.require_selected(adapter_name, "saving it (a model loaded from placeholders takes them as selected)")
        for key, value in list(state_dict.items()):
            if is_sharded(value) and (is_delta_key(key) or ".modules_to_save." in key):
                state_dict[key] = value.full_tensor()
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    # ----------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft's key remapping, after decoding format-2 records into indices and values (format 1 and in-memory
        state dicts hold those already), then the checks of `load_entries`."""
        state_dict, _ = decode_tensors(state_dict, ADAPTER_KEYS)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        load_entries(model, config, adapter_name, remapped)
        return remapped


def saved_densely(config: SparseDiffConfig, key: str) -> bool:
    """Whether peft will train module `key` densely as `modules_to_save`: its rule is a suffix match on the name
    ("classifier" also takes DistilBERT's "pre_classifier")."""
    return any(key.endswith(name) for name in config.modules_to_save or ())


def _check_no_overlap_with_modules_to_save(config: SparseDiffConfig, candidates: list[str]) -> None:
    """Refuse a module named both in target_modules and (by peft's suffix rule) in modules_to_save."""
    if config.target_modules is None or not config.modules_to_save:
        return
    probe = SimpleNamespace(exclude_modules=config.exclude_modules, modules_to_save=None,
                            target_modules=config.target_modules, target_parameters=None, layers_to_transform=None,
                            layers_pattern=None)
    both = [key for key in candidates if saved_densely(config, key) and check_target_module_exists(probe, key)]
    if both:
        targets_setting = config.target_modules
        targets_setting = sorted(targets_setting) if isinstance(targets_setting, set) else targets_setting
        raise ConfigError(
            f"{both[:5]} matched both target_modules={targets_setting!r} and "
            f"modules_to_save={list(config.modules_to_save)!r} (peft matches modules_to_save by name suffix): a "
            "module is either tuned sparsely or trained densely. Remove it from one of the two settings (task types "
            "SEQ_CLS, TOKEN_CLS and QUESTION_ANS put their head in modules_to_save themselves)."
        )


def _check_patterns_match(config: SparseDiffConfig, candidates: list[str]) -> None:
    """Refuse target_modules / exclude_modules that match none of the modules owning parameters."""
    example = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
    for field_name in ("target_modules", "exclude_modules"):
        patterns = getattr(config, field_name)
        if not patterns:
            continue
        probe = SimpleNamespace(exclude_modules=None, modules_to_save=None, target_modules=patterns,
                                target_parameters=None, layers_to_transform=None, layers_pattern=None)
        if not any(check_target_module_exists(probe, key) for key in candidates):
            raise ConfigError(
                f"{field_name}={sorted(patterns) if isinstance(patterns, set) else patterns!r} matches none of "
                f"the {len(candidates)} modules that own parameters (searched: {example}); use names or a "
                "regex from model.named_modules()."
            )


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output embeddings (`get_output_embeddings()`, e.g. `lm_head`), tied or not.

    Default targets leave them out for every task type: trainers such as TRL's SFTTrainer compute log-probabilities
    from `lm_head.weight` directly, which would bypass (or refuse) a delta on it. Name them in `target_modules` to
    tune them anyway.
    """
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        head = None
    if not isinstance(head, nn.Module):
        return set()
    return {name for name, module in model.named_modules(remove_duplicate=False)
            if module is head or (isinstance(module, BaseTunerLayer) and module.get_base_layer() is head)}


def candidate_modules(model: nn.Module) -> tuple[set[str], set[int]]:
    """Names of modules whose own parameters can carry a delta, and the ids of shared (tied) parameters.

    A module qualifies if it owns parameters directly (or is already a sam-peft layer); modules inside
    auxiliary wrappers (modules_to_save) never do. A parameter owned by several modules (tied weights, e.g.
    input and output embeddings) is not tuned at all, since a delta on one owner would not reach the other;
    a warning names it. A module that owns parameters and also has children with parameters is skipped with
    a warning (its children are targeted instead), except nn.MultiheadAttention: its kernel reads its children's
    weights directly (a delta on `out_proj` would never reach the output), so it is one unit whose own in-projection
    parameters are tuned and whose children are not. The parameters such modules own, and those the model itself
    owns (CLIP's `logit_scale`), stay frozen: one warning lists them (XLNet's `r_w_bias`, Mamba's `A_log` and `D`).
    """
    aux_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper))
    tuner_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    owners: dict[int, list[str]] = {}
    modules = []
    fused = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))
    root = list(own_parameters(model))  # the model's own parameters: no module to wrap them
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or name.startswith(aux_prefixes) or name.startswith(tuner_prefixes) or name.startswith(fused):
            continue
        if isinstance(module, AuxiliaryTrainingWrapper):
            continue
        modules.append((name, module))
        if not isinstance(module, SparseDiffLayer):
            for pname, param in own_parameters(module).items():
                owners.setdefault(id(param), []).append(f"{name}.{pname}")
    shared = {pid for pid, names in owners.items() if len(names) > 1}
    if shared:
        logger.warning("Tied parameters are not tuned (a delta on one owner would not reach the others): %s",
                       sorted(owners[pid][0] for pid in shared))
    names, skipped = set(), []
    for name, module in modules:
        if isinstance(module, SparseDiffLayer):
            names.add(name)
            continue
        params = own_parameters(module)
        if not params:
            continue
        if not isinstance(module, nn.MultiheadAttention) and any(
                own_parameters(child) for child in module.modules() if child is not module):
            skipped.append(name)
            continue
        if any(id(p) not in shared for p in params.values()):
            names.add(name)
    frozen = [f"{name}.{pname}" for name in skipped
              for pname, p in own_parameters(model.get_submodule(name)).items() if id(p) not in shared]
    frozen += [n for n in root if id(model._parameters[n]) not in shared]
    if frozen:
        logger.warning(
            "%d parameters are not tuned and stay frozen: their module also holds submodules with parameters (whose "
            "own parameters are tuned instead), or the model itself owns them: %s. To train one, name its module in "
            "modules_to_save (trained densely).", len(frozen), frozen[:20] + ([f"... ({len(frozen)} in all)"]
                                                                             if len(frozen) > 20 else []))
    return names, shared


# --------------------------------------------------------------------------- mixed batches
@contextmanager
def adapter_names_hooks(model: nn.Module, known: set[str], names: Sequence[str], kwargs: dict) -> Iterator[None]:
    """Route `adapter_names` to every sam-peft layer (as a `MixedBatch`) and every `modules_to_save` wrapper (as
    peft's list) for one forward or `generate`; beam search repeats each row's name once per beam, the encoder of
    an encoder-decoder keeps the original names (as peft does for LoRA)."""
    if model.training:
        raise ValueError("adapter_names is for inference: call model.eval() first (training a mixed-adapter batch "
                         "is not supported).")
    batch = MixedBatch.of(names)
    unknown = sorted({n for n in batch.names if n != BASE} - known)
    if unknown:
        raise ValueError(f"adapter_names names adapters this model does not hold: {unknown}; it holds "
                         f"{sorted(known)} (and '{BASE}' for the base model).")
    beams = kwargs.get("num_beams")
    per_row = list(batch.names)
    expanded = MixedBatch.of([n for n in per_row for _ in range(beams)]) if isinstance(beams, int) and beams > 1 \
        else batch
    handles = []

    def hook_for(mixed: MixedBatch):
        def inject(module, args, module_kwargs):
            if isinstance(module, SparseDiffLayer):
                return args, {**module_kwargs, "adapter_names": mixed}
            return args, {**module_kwargs, "adapter_names": list(mixed.names)}
        return inject

    def register(modules, mixed: MixedBatch) -> None:
        for module in modules:
            if isinstance(module, (SparseDiffLayer, AuxiliaryTrainingWrapper)):
                handles.append(module.register_forward_pre_hook(hook_for(mixed), with_kwargs=True))

    try:
        register(model.modules(), expanded)
        get_encoder = getattr(model, "get_encoder", None)
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        if expanded is not batch and encoder_decoder and callable(get_encoder):
            register(get_encoder().modules(), batch)  # registered last: runs last, so its names win
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- identity
def base_identity(tuner, adapter_name: str, quantization: dict | None = None) -> BaseIdentity:
    """Architecture, digest of the names and shapes, and fingerprint (None on the meta device) of the adapter's
    targeted base weights: quantized ones dequantized; float ones that `quantization` (a delta's
    `base_quantization`) records as quantized are quantized that way and dequantized first (`DenseWeights`)."""
    found = targets(tuner, adapter_name)
    on_meta = any(t.param.device.type == "meta" for t in found)
    return BaseIdentity(architecture_of(tuner.model), shapes_digest({t.name: list(t.shape) for t in found}),
                        None if on_meta else weights_fingerprint(DenseWeights.of_targets(found, quantization)))


def check_base_identity(tuner, config: SparseDiffConfig, adapter_name: str) -> None:
    """Record the base identity in a new config, or refuse a config recorded on another base (`check_same_base`;
    the weights are not compared while another adapter is merged into them)."""
    merged = any(isinstance(m, SparseDiffLayer) and m.merged for m in tuner.model.modules())
    recorded = BaseIdentity.recorded_in(config)
    new = recorded.fingerprint is None and recorded.shapes_digest is None
    if new:
        config.base_quantization = quantization_record(targets(tuner, adapter_name))
    identity = base_identity(tuner, adapter_name, None if new else config.base_quantization)
    if new:
        if merged:
            logger.warning("Adapter '%s' is added while another is merged: its fingerprint includes that delta.",
                           adapter_name)
        config.base_architecture = identity.architecture
        config.base_fingerprint = identity.fingerprint
        config.base_shapes_digest = identity.shapes_digest
        return
    check_same_base(recorded, identity.architecture, lambda: identity.fingerprint, f"adapter '{adapter_name}'",
                    shapes=identity.shapes_digest, verify_fingerprint=not merged)


# --------------------------------------------------------------------------- loading checks
def load_entries(model: nn.Module, config: SparseDiffConfig, adapter_name: str, state_dict: dict) -> None:
    """Validate the loaded indices/values and size the layers to them (before peft copies them in).

    Raises `DeltaFileError` for missing or unexpected entries, wrong dtypes or lengths, indices out of range,
    unsorted or duplicated, non-finite values, or counts that disagree with the adapter config.
    """
    counts = {}
    for prefix, module in model.named_modules():  # one walk: the state-dict prefix of every layer
        if not isinstance(module, SparseDiffLayer) or adapter_name not in module.sparsediff_values:
            continue
        for attr in module.tuned_parameters():
            numel = module.parameter_shape(attr).numel()
            name = f"{module.module_key}.{attr}"
            idx_key = delta_key(prefix, "indices", adapter_name, attr)
            val_key = delta_key(prefix, "values", adapter_name, attr)
            if idx_key not in state_dict or val_key not in state_dict:
                raise DeltaFileError(
                    f"the adapter file has no delta for '{name}' (expected both indices and values); it is "
                    "incomplete or was saved for a different model. Save it again from the trained model."
                )
            indices, values = state_dict[idx_key], state_dict[val_key]
            check_entries(name, indices, values, numel)
            expected = config.counts.get(name, 0) if config.is_selected else None
            if expected is not None and expected != indices.numel():
                raise DeltaFileError(
                    f"'{name}' has {indices.numel()} entries in the file but {expected} in the adapter config: "
                    "either the config and the weights come from different saves, or the adapter was selected "
                    "again before this load (allocation='global' can then size it differently). To resume from a "
                    "checkpoint, load it into an adapter that was not selected (SAMCallback then skips selecting)."
                )
            counts[name] = int(indices.numel())
            state_dict[idx_key] = indices.to(index_dtype(numel))
            state_dict[val_key] = values.to(torch.float32)
            if module.sparsediff_values[adapter_name][attr].numel() != indices.numel():
                module.set_entries(adapter_name, attr, state_dict[idx_key].long())
            if indices.numel() == 0:  # as after a selection (`sync_trainable`): an optimizer built now omits it
                module.sparsediff_values[adapter_name][attr].requires_grad_(False)
    check_dense_tensors(model, state_dict)
    config.counts = counts
