#!/usr/bin/env python3
"""d2l's LeNet recipe in PyTorch, for comparing kiln's accuracy and speed on the same machine.

Same model, data, batch size, initialisation (Xavier-uniform weights, PyTorch-default biases)
and epoch line as `cargo run --release --example lenet_fashion`; the optimizer flags mirror
kiln's.

    pip install torch numpy
    python3 tools/torch_train.py                                   # SGD, lr 0.9 (d2l)
    python3 tools/torch_train.py --optimizer adam --lr 0.001
    python3 tools/torch_train.py --optimizer sgd --lr 0.1 --momentum 0.9
"""
import argparse
import gzip
import time

import numpy as np
import torch
from torch import nn


def idx(path, offset):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    d = a.data
    x = torch.tensor(idx(f"{d}/train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28))
    y = torch.tensor(idx(f"{d}/train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    tx = torch.tensor(idx(f"{d}/t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28))
    ty = torch.tensor(idx(f"{d}/t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    net = lenet()
    for m in net:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
    if a.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=a.lr or 0.9, momentum=a.momentum,
                              weight_decay=a.weight_decay or 0.0)
    elif a.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=a.lr or 1e-3,
                               weight_decay=a.weight_decay or 0.0)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=a.lr or 1e-3,
                                weight_decay=0.01 if a.weight_decay is None else a.weight_decay)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    total_time, total_examples, eval_time = 0.0, 0, 0.0
    for epoch in range(a.epochs):
        net.train()
        order = torch.randperm(len(x))
        start = time.perf_counter()
        loss_sum, correct = 0.0, 0
        for s in range(0, len(x), a.batch_size):
            b = order[s:s + a.batch_size]
            xb, yb = x[b].float() / 255, y[b]
            opt.zero_grad()
            out = net(xb)
            losses = loss_fn(out, yb)
            losses.mean().backward()
            opt.step()
            loss_sum += losses.sum().item()
            correct += (out.argmax(1) == yb).sum().item()
        elapsed = time.perf_counter() - start
        total_time += elapsed
        total_examples += len(x)
        net.eval()
        eval_start = time.perf_counter()
        with torch.no_grad():
            test_correct = sum((net(tx[s:s + 1000].float() / 255).argmax(1) == ty[s:s + 1000])
                               .sum().item() for s in range(0, len(tx), 1000))
        eval_time += time.perf_counter() - eval_start
        print(f"epoch {epoch + 1}: loss {loss_sum / len(x):.3f}, train acc {correct / len(x):.3f}, "
              f"test acc {test_correct / len(tx):.3f}, {len(x) / elapsed:,.0f} examples/sec",
              flush=True)
    print(f"{total_examples / total_time:,.0f} examples/sec on {torch.get_num_threads()} CPU "
          f"threads (PyTorch {torch.__version__}); inference "
          f"{a.epochs * len(tx) / eval_time:,.0f} examples/sec")


if __name__ == "__main__":
    main()
