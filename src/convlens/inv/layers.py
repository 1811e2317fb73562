"""Which modules hold "the output of a convolutional layer" — INV's unit of explanation — and which INV explains.

INV (Bianchi et al., IJCAI-24) explains the *last nine convolutional layers* of a Keras VGG16
(``block3_conv1 .. block5_conv3``; the authors' ``buildModel.py``). A Keras ``Conv2D(activation="relu")``
returns the post-ReLU map, while PyTorch splits the same layer into ``nn.Conv2d`` and ``nn.ReLU``; so a
conv layer's output is, by default, the end of its ``Conv2d -> [norm] -> [activation]`` chain
(:func:`find_conv_layers`), and :func:`choose_conv_layers` picks the explained ones (``tail``, the paper's,
``depth`` or ``convs``). Everything is read from one traced dummy forward (module call order and tensor
identity): no per-architecture tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlens.core.hooks import eval_mode

__all__ = ["LAYER_RULES", "ConvLayer", "choose_conv_layers", "find_conv_layers"]

LAYER_RULES: tuple[str, ...] = ("tail", "depth", "convs")

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Softplus, nn.Tanh, nn.Sigmoid,
)
_ACTIVATION_NAME_PARTS = ("relu", "swish", "silu", "gelu", "mish", "elu", "sigmoid")


def is_activation(module: nn.Module) -> bool:
    """An element-wise activation module (torch's, or a library's whose class name says so)."""
    name = type(module).__name__.lower()
    return isinstance(module, _ACTIVATIONS) or any(part in name for part in _ACTIVATION_NAME_PARTS)


def is_normalization(module: nn.Module) -> bool:
    """A normalisation module (BatchNorm/LayerNorm/GroupNorm, or a class named ``*Norm*``, e.g. timm's
    ``BatchNormAct2d`` which also applies the activation)."""
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm) or (
        "norm" in type(module).__name__.lower()
    )


@dataclass(frozen=True)
class ConvLayer:
    """One convolutional layer: the module to hook (``name``) and the ``nn.Conv2d`` it starts from."""

    name: str
    conv: str
    channels: int
    spatial: tuple[int, int]
    position: int | None = None  # index among the network's conv layers (forward order); None: not a conv layer

    @property
    def label(self) -> str:
        """``"features.11 (conv features.10)"`` or just the conv name when they coincide."""
        return self.conv if self.name == self.conv else f"{self.name} (conv {self.conv})"


@dataclass
class _Call:
    name: str
    pre_index: int
    post_index: int = -1
    first_input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def _trace(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[_Call], dict[str, int]]:
    """Call records (in order of call start) and per-module call counts from one dummy forward."""
    calls: list[_Call] = []
    open_calls: dict[str, list[_Call]] = {}
    counts: dict[str, int] = {}
    events = [0]
    handles = []

    def make_hooks(name: str) -> tuple[Any, Any]:
        def pre(_m: nn.Module, inputs: tuple[object, ...]) -> None:
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            call = _Call(name, events[0], first_input=first)
            events[0] += 1
            calls.append(call)
            open_calls.setdefault(name, []).append(call)
            counts[name] = counts.get(name, 0) + 1

        def post(_m: nn.Module, _inputs: tuple[object, ...], output: object) -> None:
            call = open_calls[name].pop()
            call.post_index = events[0]
            events[0] += 1
            call.output = output if isinstance(output, torch.Tensor) else None

        return pre, post

    for name, module in model.named_modules():
        if name:
            pre, post = make_hooks(name)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return calls, counts


def _follow_chain(
    start: _Call, by_pre: list[_Call], counts: dict[str, int], modules: dict[str, nn.Module]
) -> _Call:
    """The last link of ``conv -> [norm] -> [activation]`` starting at ``start`` (see module docstring).

    ``by_pre`` holds every call in order of call start. Containers entered with the same tensor (a
    ``Sequential`` whose first child is the activation) are looked through.
    """
    current = end = start
    stage = 0  # 0: after conv; 1: after norm; 2: after activation (stop)
    while stage < 2 and current.output is not None:
        position = next((i for i, c in enumerate(by_pre) if c.pre_index > current.post_index), None)
        following: _Call | None = None
        while position is not None and position < len(by_pre):
            candidate = by_pre[position]
            if candidate.first_input is not current.output:
                break
            module = modules[candidate.name]
            is_container = any(True for _ in module.children())
            if is_container and not (is_normalization(module) or is_activation(module)):
                position += 1  # look inside the container: its first child receives the same tensor
                continue
            following = candidate
            break
        if following is None or counts[following.name] != 1:
            break
        module = modules[following.name]
        if isinstance(module, nn.Identity):
            current = following  # transparent: same tensor, keep the previous link as the end
            continue
        if stage == 0 and is_normalization(module):
            stage = 1
        elif is_activation(module):
            stage = 2
        else:
            break
        current = end = following
    return end


def find_conv_layers(
    model: nn.Module, input_shape: Sequence[int] = (3, 224, 224), post_activation: bool = True
) -> list[ConvLayer]:
    """Every ``nn.Conv2d`` called once with a spatial output larger than 1x1, in forward order.

    With ``post_activation`` the hooked module is the end of the chain ``Conv2d -> [one normalisation module]
    -> [one activation module]``, where every link consumes the previous link's output tensor directly (the
    very next module called, fed with that tensor), is called exactly once per forward (a module re-used
    several times, like ResNet's shared ``relu``, cannot be hooked unambiguously), and ``nn.Identity``
    modules in between are transparent. For torchvision's VGG16 this gives the ReLUs ``features.11 ..
    features.29`` of blocks 3-5 (exactly Keras' conv outputs); for a BN network (timm EfficientNet-Lite0:
    ``conv -> BatchNormAct2d``) the map the next layer sees.

    Args:
        model: the CNN.
        input_shape: (C, H, W) of the traced dummy forward.
        post_activation: hook the end of the ``conv -> [norm] -> [activation]`` chain (Keras-like conv
            output, default) instead of the bare convolution.
    """
    calls, counts = _trace(model, input_shape)
    modules = dict(model.named_modules())
    layers: list[ConvLayer] = []
    by_pre = sorted(calls, key=lambda c: c.pre_index)
    for call in by_pre:
        module = modules[call.name]
        if not isinstance(module, nn.Conv2d) or counts[call.name] != 1 or call.output is None:
            continue
        if call.output.ndim != 4 or call.output.shape[-2] * call.output.shape[-1] <= 1:
            continue
        end = _follow_chain(call, by_pre, counts, modules) if post_activation else call
        if end.name != call.name and (end.output is None or end.output.shape != call.output.shape):
            end = call
        channels, height, width = (int(v) for v in call.output.shape[1:])
        layers.append(ConvLayer(end.name, call.name, channels, (height, width), len(layers)))
    return layers


def choose_conv_layers(convs: Sequence[ConvLayer], rule: str, num_layers: int) -> list[ConvLayer]:
    """The conv layers INV explains under ``rule``, in forward order; with fewer than ``num_layers``, all.

    * ``"tail"`` (default): the last ``num_layers``, the paper's choice (VGG16's last nine: blocks 3-5, 56x56
      to 14x14 maps). On networks with many layers in their last stage it stays there (EfficientNet-Lite0:
      nine 7x7 maps of stages 6-7).
    * ``"depth"``: ``num_layers`` layers spread over the whole depth: the conv layers are cut into
      ``num_layers`` consecutive runs of (nearly) equal length and the last of each run is taken, positions
      ``ceil((i + 1) n / m) - 1`` for ``i = 0..m-1`` of ``n``. The deepest layer is always included; the
      spacing is even in layer count, not resolution (VGG16: conv1_2, conv2_1, conv3_1, conv3_2, conv4_1,
      conv4_2, conv5_1, conv5_2, conv5_3).
    * ``"convs"``: all of them."""
    if rule not in LAYER_RULES:
        raise ValueError(f"unknown layer rule {rule!r}; choose one of {', '.join(LAYER_RULES)}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    n = len(convs)
    if rule == "convs" or n <= num_layers:
        return list(convs)
    if rule == "tail":
        return list(convs[-num_layers:])
    return [convs[-(-(i + 1) * n // num_layers) - 1] for i in range(num_layers)]
