"""Activations and gradients of chosen layers from one forward (+ one backward).

Forward hooks capture the outputs of the named layers; gradients come from
``torch.autograd.grad(score, activations)`` — no tensor hooks, so in-place ReLU after a hooked
layer is safe: the hook passes a *clone* downstream and keeps the original, which no later in-place
operation can touch. Hooks are removed and the model's training flag restored on exit, also when the
body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import torch
from torch import nn

from convlens.core.targets import OutputAdapter, adapt_output

__all__ = ["LayerCapture", "eval_mode", "forward_with_grads"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the body; restore every submodule's training flag after."""
    flags = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        yield model
    finally:
        for name, m in model.named_modules():
            if name in flags:
                m.training = flags[name]


class LayerCapture:
    """Context manager that records the outputs of ``layer_names`` on every forward.

    >>> with LayerCapture(model, ["layer4"], keep_graph=True) as cap:
    ...     logits = model(x)
    ...     acts = cap.activations["layer4"]

    With ``keep_graph=False`` (forward-only methods) activations are detached copies.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], keep_graph: bool = False) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in layer_names if n not in modules]
        if missing:
            raise ValueError(f"layers not found in model: {missing}")
        self.model = model
        self.layer_names = list(dict.fromkeys(layer_names))
        self.keep_graph = keep_graph
        self.activations: dict[str, torch.Tensor] = {}
        self._modules = [modules[n] for n in self.layer_names]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mode: contextlib.AbstractContextManager[nn.Module] | None = None

    def _make_hook(self, name: str) -> Callable[[nn.Module, object, object], object]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> object:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, expected a tensor")
            if self.keep_graph:
                self.activations[name] = output
                return output.clone()  # downstream in-place ops modify the clone, not ours
            self.activations[name] = output.detach().clone()
            return None

        return hook

    def __enter__(self) -> LayerCapture:
        self._mode = eval_mode(self.model)
        self._mode.__enter__()
        for name, module in zip(self.layer_names, self._modules, strict=True):
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.activations = {}
        if self._mode is not None:
            self._mode.__exit__(exc_type, exc, tb)
            self._mode = None


def forward_with_grads(
    model: nn.Module,
    x: torch.Tensor,
    layer_names: Sequence[str],
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    output_adapter: OutputAdapter | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward and one backward: logits, activations and d(sum of scores)/d(activation).

    ``score_fn`` maps the logits (B, classes) to one score per sample (B,); the gradient of their sum
    gives each sample its own gradient because samples do not interact in eval mode.
    Returned tensors are detached.
    """
    x = x.detach().clone().requires_grad_(True)  # activations need grad even with frozen weights
    with torch.enable_grad(), LayerCapture(model, layer_names, keep_graph=True) as cap:
        logits = adapt_output(model(x), output_adapter)
        scores = score_fn(logits)
        acts = [cap.activations[n] for n in cap.layer_names]
        grads = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
        activations = {n: a.detach() for n, a in zip(cap.layer_names, acts, strict=True)}
        unused = [n for n, g in zip(cap.layer_names, grads, strict=True) if g is None]
        if unused:
            raise ValueError(f"the target score does not depend on layer(s) {unused}: pick layers before the head")
        gradients = {n: g.detach() for n, g in zip(cap.layer_names, grads, strict=True)}
    return logits.detach(), activations, gradients
