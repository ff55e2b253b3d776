#!/usr/bin/env python3
"""Loads a kiln checkpoint, optimizer state included, into PyTorch and takes steps with it.

kiln writes the parameters under their state-dict names and the optimizer state as
`optimizer.state.<param>.<key>` (PyTorch's keys: momentum_buffer, exp_avg, exp_avg_sq, step),
with `optimizer` (the class name) and `optimizer.param_group` (param_groups[0] as JSON) in the
metadata. `load(path, model)` rebuilds `optimizer.state_dict()` from that and returns a
`torch.optim` optimizer that continues where kiln stopped.

    pip install torch numpy safetensors
    lenet_fashion --optimizer adam --epochs 1 --save a.st
    lenet_fashion --optimizer adam --epochs 1 --init a.st --no-shuffle --limit 256 \\
        --batch-size 256 --save b.st       # one more step, on the first 256 examples
    python3 tools/torch_resume.py a.st --steps 1 --batch 256 --compare b.st

With --compare, takes the same steps in PyTorch on the first examples in order and prints how
far its parameters and state end from the second checkpoint's.
"""
import argparse
import gzip
import json

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

PREFIX = "optimizer.state."


def lenet(act, pool):
    a = nn.Sigmoid if act == "sigmoid" else nn.ReLU
    p = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), a(), p(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), a(), p(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), a(),
        nn.Linear(120, 84), a(),
        nn.Linear(84, 10))


def load(path, model):
    """Loads parameters and optimizer state; returns the torch.optim optimizer."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(PREFIX)})
    group = json.loads(meta["optimizer.param_group"])
    names = [n for n, _ in model.named_parameters()]
    cls = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
    kind = meta["optimizer"]
    kwargs = {k: v for k, v in group.items() if k != "maximize"}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    opt = cls[kind](model.parameters(), foreach=False, **kwargs)
    state = {}
    for i, n in enumerate(names):
        s = {k[len(PREFIX) + len(n) + 1:]: v for k, v in tensors.items()
             if k.startswith(f"{PREFIX}{n}.")}
        if s:
            state[i] = s
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return opt


def idx(path, offset):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--act", choices=["sigmoid", "relu"], default="sigmoid")
    ap.add_argument("--pool", choices=["avg", "max"], default="avg")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compare")
    a = ap.parse_args()
    model = lenet(a.act, a.pool)
    opt = load(a.checkpoint, model)
    print(f"loaded {a.checkpoint}: {type(opt).__name__}, state of {len(opt.state)} tensors")
    x = idx(f"{a.data}/train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    y = idx(f"{a.data}/train-labels-idx1-ubyte.gz", 8)
    for s in range(a.steps):
        xb = torch.tensor(x[s * a.batch:(s + 1) * a.batch], dtype=torch.float32) / 255
        yb = torch.tensor(y[s * a.batch:(s + 1) * a.batch], dtype=torch.long)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        print(f"step {s + 1}: loss {loss.item():.6f}")
    if a.compare:
        want = load_file(a.compare)
        names = [n for n, _ in model.named_parameters()]
        worst = 0.0
        for i, (n, p) in enumerate(model.named_parameters()):
            pairs = [(n, p.detach())]
            pairs += [(f"{PREFIX}{n}.{k}", v) for k, v in opt.state[p].items()]
            for key, got in pairs:
                w = want[key]
                err = ((got - w).abs() / (1 + w.abs())).max().item()
                worst = max(worst, err)
                print(f"{key:40s} max rel. difference {err:.2e}")
        print(f"worst: {worst:.2e} over {len(names)} parameters and their state")


if __name__ == "__main__":
    main()
