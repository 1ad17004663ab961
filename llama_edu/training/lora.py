"""Low-rank adapters (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Fine-tuning changes a pretrained weight W0 (out, in) by some ΔW. LoRA's bet is that ΔW has low
rank, so it learns it as a product of two thin matrices and leaves W0 frozen (paper, eq. 3, with
the alpha / r scale of its section 4.1):

    h = W0 x + (alpha / r) · B A x          A: (r, in), B: (out, r), r << min(in, out)

A starts random (Kaiming-uniform, as PEFT does; the paper uses a Gaussian) and B starts at zero,
so at step 0 the adapted model *is* the pretrained model. Only A and B train: for a 4096 x 4096
projection at r = 8 that is 65,536 numbers instead of 16.8 million. ``alpha / r`` keeps the size
of the update roughly independent of the rank, so changing r does not mean retuning the
learning rate.

What this module gives, in PEFT's names so adapters move to the tools learners use next:

- :func:`lora_forward` / :func:`lora_update`: the equation above, as plain tensor algebra.
- :class:`LoraLinear`: wraps *any* base module that has ``in_features``/``out_features`` and
  computes a linear map (``nn.Linear``, or a quantized linear layer for QLoRA), exposing
  ``base_layer``, ``lora_A``, ``lora_B`` as PEFT names them.
- :class:`LoraConfig`, :func:`apply_lora`: put adapters on projections chosen by name
  (``q_proj``, ``v_proj``, ...) and freeze everything else (:func:`mark_only_lora_as_trainable`,
  :func:`count_parameters`).
- :func:`merge_lora` / :func:`unmerge_lora` / :func:`merge_and_unload`: fold B A into W0 for
  inference at no extra cost, and take it out again.
- :func:`save_lora_adapter` / :func:`load_lora_adapter`: the adapter alone, in PEFT's layout
  (``adapter_config.json`` + ``adapter_model.safetensors`` with keys such as
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). PEFT's
  ``PeftModel.from_pretrained`` loads these onto transformers' ``LlamaForCausalLM`` (tested).

Typical use::

    model = LlamaForCausalLM.from_pretrained("data/shakespeare-llama")
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj")))
    print(count_parameters(model))          # (trainable, total)
    ... train ...
    save_lora_adapter(model, "my-adapter")
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..io.atomic_save import replace_folder_files
from ..io.files import atomic_write_bytes, read_json_object

# The Llama projections an adapter may sit on (transformers' module names).
LORA_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT wraps a model as PeftModel.base_model (a LoraModel) .model (the transformers model), so the
# keys it saves start with this prefix.
PEFT_KEY_PREFIX = "base_model.model."


# -- the equation -------------------------------------------------------------------------------


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, r: int) -> torch.Tensor:
    """The adapter's contribution (alpha / r) · B A x, for a batch of row vectors.

    x: (..., in); lora_A: (r, in); lora_B: (out, r) -> (..., out). Computed as two thin
    products, x A^T then (·) B^T, never forming the (out, in) matrix B A.
    """
    return (x @ lora_A.t()) @ lora_B.t() * (alpha / r)


def lora_forward(
    x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, r: int
) -> torch.Tensor:
    """A LoRA-adapted linear layer without bias (Hu et al. 2021: eq. 3, scaled by alpha / r as in section 4.1):

        x W^T + (alpha / r) · x A^T B^T

    x: (..., in); weight W0: (out, in); lora_A: (r, in); lora_B: (out, r) -> (..., out).
    :class:`LoraLinear` computes the same thing with any base layer in place of ``x W^T``.
    """
    return x @ weight.t() + lora_update(x, lora_A, lora_B, alpha, r)


# -- the layer ----------------------------------------------------------------------------------


def _check_rank_alpha(r: Any, lora_alpha: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer (e.g. 8), got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not 0 < lora_alpha < math.inf:
        raise ValueError(f"lora_alpha must be a positive finite number (e.g. 16, often 2 * r), got {lora_alpha!r}")


class LoraLinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update:
    ``forward(x) = base_layer(x) + (lora_alpha / r) · lora_B(lora_A(dropout(x)))``.

    ``base_layer`` is any module with ``in_features``/``out_features`` whose forward is a linear
    map of its input (an ``nn.Linear``, or a quantized linear layer: that is QLoRA). Input
    (..., in_features) -> output (..., out_features), in the base layer's output dtype. The
    adapter's own parameters live in ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r),
    by default in float32 whatever the base stores.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_rank_alpha(r, lora_alpha)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        in_features = getattr(base_layer, "in_features", None)
        out_features = getattr(base_layer, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise TypeError(
                f"LoraLinear needs a base layer with integer in_features and out_features (a linear map), "
                f"got {type(base_layer).__name__}"
            )
        if isinstance(base_layer, LoraLinear):
            raise TypeError("this layer already has a LoRA adapter; apply LoRA once per layer")
        self.base_layer = base_layer.requires_grad_(False)  # W0 stays as pretrained
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_alpha / r
        base_weight = getattr(base_layer, "weight", None)
        # The adapters live where the base does (a quantized base may hold only buffers).
        first = next(itertools.chain(base_layer.parameters(), base_layer.buffers()), None)
        device = first.device if first is not None else None
        if dtype is None:  # float32 adapters unless the base is float64 (tests) or on meta
            dtype = torch.float64 if isinstance(base_weight, torch.Tensor) and base_weight.dtype == torch.float64 else torch.float32
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.disabled = False  # True: behave exactly as the base layer (a reference model for free)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform (PEFT's default; the paper uses a Gaussian), B = 0, so ΔW = 0 at the start."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        a, b = self.lora_A.weight, self.lora_B.weight
        delta = lora_update(self.lora_dropout(x.to(a.dtype)), a, b, self.lora_alpha, self.r)
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) · B A, shape (out_features, in_features), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _float_base_weight(self) -> torch.Tensor:
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or tuple(w.shape) != (self.out_features, self.in_features):
            raise TypeError(
                f"cannot merge a LoRA adapter into a {type(self.base_layer).__name__}: merging needs a float "
                f"`weight` of shape ({self.out_features}, {self.in_features}). For a quantized base, "
                "dequantize it first, or keep the adapter unmerged"
            )
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + ΔW, so the forward costs one matmul; the adapter is kept for :meth:`unmerge`."""
        if self.merged:
            raise ValueError("this LoRA layer is already merged; unmerge() it first")
        w = self._float_base_weight()
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - ΔW: back to the frozen base weight plus a separate adapter."""
        if not self.merged:
            raise ValueError("this LoRA layer is not merged; nothing to unmerge")
        w = self._float_base_weight()
        w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


# -- putting adapters on a model ----------------------------------------------------------------


@dataclass
class LoraConfig:
    """Which projections get adapters, and their rank, alpha and dropout (PEFT's field names).

    ``modules_to_save`` names modules trained in full and saved with the adapter: a new
    classification head (``score``) is the usual one, since it starts random.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    task_type: str | None = None  # "CAUSAL_LM" or "SEQ_CLS"; filled in from the model if None

    def __post_init__(self) -> None:
        _check_rank_alpha(self.r, self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError(f"target_modules is empty; choose some of {', '.join(LORA_TARGET_NAMES)}")
        unknown = [n for n in self.target_modules if n not in LORA_TARGET_NAMES]
        if unknown:
            raise ValueError(
                f"unknown LoRA target module(s) {unknown}; valid choices are {', '.join(LORA_TARGET_NAMES)}"
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save or ())

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` contents, with the fields PEFT 0.10 writes for LoRA."""
        return {
            "alpha_pattern": {},
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": list(self.modules_to_save) or None,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": None,
            "target_modules": sorted(self.target_modules),
            "task_type": self.task_type,
            "use_dora": False,
            "use_rslora": False,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> "LoraConfig":
        """Read a PEFT ``adapter_config.json``; variants this module does not implement are refused."""
        if d.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}; only LoRA adapters ('LORA') load here")
        unsupported = {
            "use_rslora": bool(d.get("use_rslora")),
            "use_dora": bool(d.get("use_dora")),
            "fan_in_fan_out": bool(d.get("fan_in_fan_out")),
            "bias": d.get("bias", "none") != "none",
            "rank_pattern": bool(d.get("rank_pattern")),
            "alpha_pattern": bool(d.get("alpha_pattern")),
            "layers_to_transform": d.get("layers_to_transform") is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"{source}: LoRA options {bad} are not supported by llama_edu.lora; load it with PEFT")
        targets = d.get("target_modules")
        if isinstance(targets, str):
            raise ValueError(f"{source}: target_modules is a regular expression ({targets!r}); only a list of names loads here")
        return cls(
            r=d["r"],
            lora_alpha=d["lora_alpha"],
            lora_dropout=d.get("lora_dropout", 0.0),
            target_modules=tuple(targets or ()),
            modules_to_save=tuple(d.get("modules_to_save") or ()),
            base_model_name_or_path=d.get("base_model_name_or_path"),
            task_type=d.get("task_type"),
        )


def _task_type(model: nn.Module) -> str | None:
    if callable(getattr(model, "next_token_logits", None)):  # has an LM head (LlamaForCausalLM)
        return "CAUSAL_LM"
    if isinstance(getattr(model, "score", None), nn.Module):
        return "SEQ_CLS"
    return None


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every :class:`LoraLinear` in ``model``, by its module path (``model.layers.0.self_attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Replace every module named in ``config.target_modules`` by a :class:`LoraLinear` around it,
    then freeze everything except the adapters and ``config.modules_to_save``. In place; returns
    ``model``. The forward is unchanged at this point (B = 0)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a llama_edu.lora.LoraConfig, got {type(config).__name__}")
    if lora_layers(model):
        raise ValueError("this model already has LoRA adapters; apply_lora once (or merge_and_unload first)")
    model_config = getattr(model, "config", None)
    if getattr(model_config, "pretraining_tp", 1) != 1:
        # sliced_linear reads the weight directly when pretraining_tp > 1, which would skip the adapter.
        raise ValueError("LoRA needs config.pretraining_tp == 1 (the slices read weights directly); set it to 1 first")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in config.target_modules
    ]
    found = {name.rsplit(".", 1)[-1] for name, _ in targets}
    missing = [n for n in config.target_modules if n not in found]
    if missing:
        raise ValueError(f"the model has no module named {missing}; valid choices are {', '.join(LORA_TARGET_NAMES)}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, config.r, config.lora_alpha, config.lora_dropout))
    if config.task_type is None:
        config.task_type = _task_type(model)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model_config, "name_or_path", None) or getattr(model_config, "_name_or_path", None)
    model.lora_config = config  # what save_lora_adapter writes
    mark_only_lora_as_trainable(model, config.modules_to_save)
    return model


def mark_only_lora_as_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> None:
    """requires_grad = True for ``lora_A``/``lora_B`` and the modules named in ``modules_to_save``
    (e.g. ``score``), False for everything else."""
    modules_to_save = tuple(modules_to_save)
    for name in modules_to_save:
        if not any(n.rsplit(".", 1)[-1] == name for n, _ in model.named_modules()):
            raise ValueError(f"modules_to_save names {name!r}, which is not a module of this model")
    for name, p in model.named_parameters():
        parts = name.split(".")
        p.requires_grad = "lora_A" in parts or "lora_B" in parts or any(m in parts for m in modules_to_save)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, adapters included in the total, as PEFT reports them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_parameters_report(model: nn.Module) -> str:
    """One line in PEFT's ``print_trainable_parameters`` wording."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every adapter off (the model computes exactly its base) or back on. DPO uses the
    disabled model as its frozen reference without a second copy of the weights."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to enable or disable")
    for layer in layers.values():
        if layer.merged and not enabled:
            raise ValueError("cannot disable a merged adapter; unmerge_lora(model) first")
        layer.disabled = not enabled


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W0 += (alpha/r) B A). Outputs are unchanged up to
    rounding; the forward no longer pays for the adapters."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    for layer in layers.values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`: subtract every adapter from its base weight again."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to unmerge")
    for layer in layers.values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base layers back: a normal model with the same
    state-dict keys as before LoRA, ready for ``save_pretrained``. In place; returns ``model``."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# -- saving and loading the adapter alone, in PEFT's layout --------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys: ``base_model.model.<module path>.lora_A.weight``
    (and ``lora_B``), plus ``base_model.model.<path>.weight`` for each module in ``modules_to_save``."""
    config: LoraConfig | None = getattr(model, "lora_config", None)
    layers = lora_layers(model)
    if config is None or not layers:
        raise ValueError("the model has no LoRA adapters; call apply_lora(model, LoraConfig(...)) first")
    out = {}
    for name, layer in layers.items():
        out[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        out[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1] in config.modules_to_save:
            for pname, p in module.named_parameters():
                out[f"{PEFT_KEY_PREFIX}{module_name}.{pname}"] = p
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_lora_adapter(model: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout) to
    ``save_directory``: both replace the previous adapter together or not at all
    (:func:`llama_edu.io.atomic_save.replace_folder_files`; other files in the folder are kept).
    Returns the folder."""
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder; give a folder to save the adapter in")
    tensors = lora_state_dict(model)
    config: LoraConfig = model.lora_config
    text = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n"
    with replace_folder_files(directory, lambda name: name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME), last=None) as staging:
        atomic_write_bytes(staging / ADAPTER_WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
        atomic_write_bytes(staging / ADAPTER_CONFIG_NAME, text.encode("utf-8"))
    return directory


def read_lora_config(directory: str | os.PathLike) -> LoraConfig:
    """The :class:`LoraConfig` in ``directory/adapter_config.json``."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {directory}; is it a LoRA adapter folder saved by save_lora_adapter or PEFT?")
    data = read_json_object(path, "is it an adapter_config.json saved by save_lora_adapter or PEFT?")
    return LoraConfig.from_peft_dict(data, source=str(path))


def load_lora_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the adapter saved in ``directory`` (by :func:`save_lora_adapter` or PEFT) on ``model``.

    A model without adapters gets them (:func:`apply_lora` with the saved config); a model that
    has them must match the saved ranks and targets. Every saved tensor must find its place and
    every adapter must be filled: otherwise a ValueError lists the keys. Returns ``model``.
    """
    config = read_lora_config(directory)
    weights_path = Path(directory) / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        hint = " (PEFT's old pickle format adapter_model.bin is not read: re-save it with safe_serialization=True)" if (Path(directory) / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {directory}{hint}")
    # PEFT's sequence-classification models list both head names ("classifier", "score");
    # keep those this model has.
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    config.modules_to_save = tuple(m for m in config.modules_to_save if m in names)
    applied_here = not lora_layers(model)
    if applied_here:
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        apply_lora(model, config)
    else:
        if any(layer.merged for layer in lora_layers(model).values()):
            raise ValueError("the model's adapters are merged; unmerge_lora(model) before loading new adapter weights")
        have: LoraConfig | None = getattr(model, "lora_config", None)
        if have is None or (have.r, set(have.target_modules)) != (config.r, set(config.target_modules)):
            raise ValueError(
                f"the model's adapters (r={getattr(have, 'r', '?')}, targets={getattr(have, 'target_modules', '?')}) "
                f"do not match the saved ones (r={config.r}, targets={config.target_modules})"
            )
    try:
        _copy_adapter_weights(model, load_file(str(weights_path)), directory)
    except BaseException:
        if applied_here:  # leave the model as it came: no half-loaded adapters
            for name, layer in lora_layers(model).items():
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
            del model.lora_config
            for n, p in model.named_parameters():
                p.requires_grad = requires_grad[n]
        raise
    return model


def _copy_adapter_weights(model: nn.Module, saved: dict[str, torch.Tensor], directory) -> None:
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter in {directory} does not fit this model: missing keys {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected keys {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    params = dict(model.named_parameters())
    for key, value in saved.items():  # every tensor is checked before the first is copied
        p = params[key[len(PEFT_KEY_PREFIX):]]
        if p.shape != value.shape:
            raise ValueError(f"{key}: saved shape {tuple(value.shape)} does not match the model's {tuple(p.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{key} in {directory} holds {value.dtype} values, not floating point: the adapter is corrupt")
        if not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).sum().item()
            raise ValueError(f"{key} in {directory} holds {bad} NaN or infinite value(s): the adapter is corrupt "
                             "(a diverged training run?); retrain it or load an earlier checkpoint")
    with torch.no_grad():
        for key, value in saved.items():
            p = params[key[len(PEFT_KEY_PREFIX):]]
            p.copy_(value.to(p.dtype))
