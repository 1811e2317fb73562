"""Train the synthetic-benchmark CNNs on CPU and record seed, recipe, class names and test accuracy.

    python tools/train_synthetic.py --model synthetic-vgg
    python tools/train_synthetic.py --model synthetic-resnet

A maintainer's tool, not part of the installed package: it regenerates the weights committed in
``src/convlens/models/weights/`` (``<model>.pt``, a plain state_dict, and ``synthetic_models.json``). It
sits above both layers it uses — the data generator (:mod:`convlens.data.synthetic`) and the model
definitions (:mod:`convlens.models.synthetic`) — which is why it is neither in ``data/`` nor in
``models/``. Training data are split ``train`` of the generator (seed 0 by default), model selection is
never done on the test split; the reported accuracy is on split ``test``. Deterministic on one CPU thread
for a given seed and PyTorch version.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from convlens.data.synthetic import CLASS_NAMES, generate_batch
from convlens.models.synthetic import (
    SYNTHETIC_MODELS,
    WEIGHTS_DIR,
    build_synthetic_model,
    evaluate_accuracy,
    to_model_input,
)

__all__ = ["main", "train"]


def train(
    name: str,
    seed: int = 0,
    train_size: int = 12000,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 4e-3,
    weight_decay: float = 5e-4,
    log: bool = True,
) -> tuple[torch.nn.Module, dict[str, object]]:
    """Train model ``name`` with AdamW and a one-cycle schedule on freshly generated split-``train`` images."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    pixels, labels, _ = generate_batch(0, train_size, seed=seed, split="train")
    val_pixels, val_labels, _ = generate_batch(0, 1000, seed=seed, split="val")
    generation_s = time.perf_counter() - t0
    model = build_synthetic_model(name, len(CLASS_NAMES))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(train_size / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch)
    order_rng = np.random.default_rng(seed)
    t1 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        order = order_rng.permutation(train_size)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = to_model_input(pixels[idx])
            if order_rng.random() < 0.5:  # horizontal flips keep shapes, textures and classes
                x = x.flip(-1)
            loss = F.cross_entropy(model(x), torch.from_numpy(labels[idx]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(idx)
        val_accuracy = evaluate_accuracy(model, val_pixels, val_labels)
        history.append({"epoch": epoch + 1, "loss": total_loss / train_size, "val_accuracy": val_accuracy})
        if log:
            print(f"{name} epoch {epoch + 1}/{epochs}: loss {total_loss / train_size:.4f}, val acc {val_accuracy:.4f}")
    recipe: dict[str, object] = {
        "seed": seed, "train_split": "train", "train_size": train_size, "epochs": epochs, "batch_size": batch_size,
        "optimiser": "AdamW", "lr": lr, "weight_decay": weight_decay, "schedule": "OneCycleLR",
        "augmentation": "random horizontal flip per batch", "generation_s": round(generation_s, 1),
        "training_s": round(time.perf_counter() - t1, 1), "history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model.eval(), recipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SYNTHETIC_MODELS), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1 = deterministic and fastest on shared machines)"
    )
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, recipe = train(args.model, seed=args.seed, train_size=args.train_size, epochs=args.epochs)
    test_pixels, test_labels, _ = generate_batch(0, args.test_size, seed=args.seed, split="test")
    accuracy = evaluate_accuracy(model, test_pixels, test_labels)
    print(f"{args.model}: test accuracy {accuracy:.4f} on {args.test_size} split-test images")
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{args.model.replace('-', '_')}.pt"
    torch.save(model.state_dict(), weights)
    info_path = args.out / "synthetic_models.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info[args.model] = {
        "weights": weights.name,
        "class_names": list(CLASS_NAMES),
        "test_accuracy": accuracy,
        "test_split": "test",
        "test_size": args.test_size,
        "torch": torch.__version__,
        "threads": args.threads,
        **recipe,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
