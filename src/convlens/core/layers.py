"""Layer discovery: which modules of a CNN an explanation method should look at.

Strategies (:func:`resolve_layers`, reusable by every method): ``"blocks"`` — the last layer of every
convolutional block, i.e. every layer whose output is followed by a spatial down-sampling, plus the last
layer with spatial extent (SISE's Phase-1 rule, Sattarzadeh et al., AAAI-21: torchvision's ResNet-50 gives
``relu, layer1, layer2, layer3, layer4``, 3904 maps); ``"last"`` — the last of those blocks (the usual
Grad-CAM layer); or explicit module names or objects. Everything is found from the output shapes of one
dummy forward (:func:`find_block_layers`), so no per-architecture name tables are needed.
"""

from __future__ import annotations

import difflib
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerInfo", "LayerSpec", "describe_layers", "find_block_layers", "resolve_layers"]

logger = logging.getLogger("convlens.layers")

LayerSpec = str | nn.Module | Sequence[str | nn.Module]


@dataclass(frozen=True)
class LayerInfo:
    """What one dummy forward tells about a module."""

    name: str
    order: int  # completion index of its first call
    shape: tuple[int, ...] | None  # output shape of its first call, without batch; None if not a tensor
    has_params: bool

    @property
    def spatial(self) -> tuple[int, int] | None:
        if self.shape is not None and len(self.shape) == 3:
            return (self.shape[1], self.shape[2])
        return None

    @property
    def area(self) -> int | None:
        sp = self.spatial
        return None if sp is None else sp[0] * sp[1]


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def describe_layers(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224)) -> dict[str, LayerInfo]:
    """Run one dummy forward (batch 1, zeros) and record each called module's output shape.

    The model's training flag is restored afterwards; no gradients are computed.
    """
    infos: dict[str, LayerInfo] = {}
    counter = [0]
    handles = []

    def make_hook(name: str, module: nn.Module):
        has_params = any(True for _ in module.parameters(recurse=False))

        def hook(_mod: nn.Module, _inp: object, out: object) -> None:
            if name in infos:
                return
            tensor = _first_tensor(out)
            shape = tuple(tensor.shape[1:]) if tensor is not None else None
            infos[name] = LayerInfo(name, counter[0], shape, has_params)
            counter[0] += 1

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name, module)))
    was_training = model.training
    try:
        model.eval()
        try:
            param = next(model.parameters())
            device, dtype = param.device, param.dtype
        except StopIteration:
            device, dtype = torch.device("cpu"), torch.float32
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return infos


def _children_in_order(module: nn.Module, prefix: str, infos: dict[str, LayerInfo]) -> list[str]:
    names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_children()]
    called = [n for n in names if n in infos]
    return sorted(called, key=lambda n: infos[n].order)


def _flat_sequence(model: nn.Module, infos: dict[str, LayerInfo]) -> list[str]:
    modules = dict(model.named_modules())
    sequence: list[str] = []

    def visit(prefix: str) -> None:
        for child in _children_in_order(modules[prefix], prefix, infos):
            grand = _children_in_order(modules[child], child, infos)
            sizes = {infos[g].spatial for g in grand if infos[g].spatial is not None}
            if len(sizes) >= 2:
                visit(child)
            else:
                sequence.append(child)

    visit("")
    return sequence


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm) or (
        "norm" in type(module).__name__.lower()
    )


_BLOCKS_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], list[str]]] = weakref.WeakKeyDictionary()


def find_block_layers(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224)) -> list[str]:
    """Names of the last layer of every convolutional block, found from one dummy forward's output shapes:

    1. record, for every module called during the forward, its first-call completion index and its output
       shape (4-D tensors only have spatial extent);
    2. build a flat sequence of modules in execution order from the root's children: a child whose own
       children produce two or more spatial sizes (a container that down-samples *between* its children, e.g.
       VGG's ``features``) is replaced by its children, recursively; a container whose children share one size
       (a ResNet stage whose first bottleneck down-samples internally) stays one unit;
    3. an item ends a block if the next 4-D item is spatially smaller (or none follows) and the segment since
       the previous block end has learnable parameters (VGG's trailing parameter-free pools form no block);
    4. a block end that is a normalisation layer opening a down-sampling container (ConvNeXt's ``LayerNorm ->
       Conv(stride 2)``) is replaced by the item before it, the stage output.

    The result is cached per model object and input shape (the dummy forward runs once); a model whose
    modules are replaced afterwards should be passed as a new object.
    """
    shape = tuple(int(s) for s in input_shape)
    cached = _BLOCKS_CACHE.get(model, {}).get(shape)
    if cached is not None:
        return list(cached)
    blocks = _find_block_layers(model, shape)
    _BLOCKS_CACHE.setdefault(model, {})[shape] = blocks
    return list(blocks)


def _find_block_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    infos = describe_layers(model, input_shape)
    modules = dict(model.named_modules())
    sequence = [n for n in _flat_sequence(model, infos)]
    spatial_items = [(i, n) for i, n in enumerate(sequence) if infos[n].spatial is not None]
    blocks: list[str] = []
    segment_has_params = False
    for pos, (i, name) in enumerate(spatial_items):
        # parameters anywhere inside the sequence items since the last block end
        if any(True for _ in modules[name].parameters()):
            segment_has_params = True
        area = infos[name].area or 0
        next_area = infos[spatial_items[pos + 1][1]].area if pos + 1 < len(spatial_items) else None
        # a non-4-D item between two spatial items also closes the block
        next_seq_is_flat = i + 1 < len(sequence) and infos[sequence[i + 1]].spatial is None
        ends_block = next_area is None or next_area < area or next_seq_is_flat
        if ends_block and area > 1 and segment_has_params:
            chosen = name
            parent_name = name.rsplit(".", 1)[0] if "." in name else ""
            parent_info = infos.get(parent_name)
            if (
                _is_norm(modules[name])
                and parent_info is not None
                and parent_info.area is not None
                and parent_info.area < area
                and i > 0
                and infos[sequence[i - 1]].shape == infos[name].shape
            ):
                chosen = sequence[i - 1]
            blocks.append(chosen)
            segment_has_params = False
        if next_seq_is_flat:
            break
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no convolutional layer with a spatial output larger than 1x1 "
            f"for input shape {tuple(input_shape)}: convlens explains CNNs with 4-D feature maps."
        )
    return blocks


def resolve_layers(
    model: nn.Module, spec: LayerSpec = "last", input_shape: Sequence[int] = (3, 224, 224)
) -> list[str]:
    """Resolve a layer specification to module names of ``model``.

    Args:
        model: the network.
        spec: ``"blocks"``, ``"last"``, a module name, a module, or a list of names/modules.
        input_shape: (C, H, W) of the dummy forward used by the automatic strategies.

    Raises:
        ValueError: unknown names (with the closest matches) or no suitable layer.
    """
    if isinstance(spec, str) and spec in ("blocks", "last"):
        blocks = find_block_layers(model, input_shape)
        chosen = blocks if spec == "blocks" else blocks[-1:]
        logger.info("layers %r resolved to %s", spec, ", ".join(chosen))
        return chosen
    items: Sequence[str | nn.Module] = [spec] if isinstance(spec, str | nn.Module) else list(spec)
    if not items:
        raise ValueError("empty layer list")
    by_module = {id(m): n for n, m in model.named_modules()}
    names = dict(model.named_modules())
    resolved: list[str] = []
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in by_module:
                raise ValueError(f"module {type(item).__name__} is not part of the model")
            resolved.append(by_module[id(item)])
            continue
        if item in ("blocks", "last"):
            resolved.extend(resolve_layers(model, item, input_shape))
            continue
        if item not in names or item == "":
            close = difflib.get_close_matches(item, [n for n in names if n], n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"layer {item!r} not found in {type(model).__name__}{hint}")
        resolved.append(item)
    return resolved
