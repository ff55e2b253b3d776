#!/usr/bin/env python3
"""Evaluates a kiln LeNet checkpoint with PyTorch's semantics written in numpy, without kiln.

The layouts are PyTorch's: conv weights OIHW applied as cross-correlation (conv1 padded by 2),
2x2 pooling with stride 2, flatten in C,H,W order, Linear as y = x W^T + b. If kiln's
checkpoint agrees with this, d2l's nn.Sequential LeNet loads it with
`net.load_state_dict(safetensors.torch.load_file(path))` and computes the same thing.

    pip install numpy safetensors
    python3 tools/check_checkpoint.py lenet.safetensors                      # d2l's LeNet
    python3 tools/check_checkpoint.py relu.safetensors --act relu --pool max  # --variant relu-maxpool

Prints the accuracy on the first --count test images and image 0's top-3 probabilities, to
compare with `lenet_fashion --init CKPT --predict 0`.
"""
import argparse
import gzip

import numpy as np
from safetensors.numpy import load_file


def idx(path, offset):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def conv(x, w, b, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = h - kh + 1, wd - kw + 1
    taps = [x[:, :, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)]
    cols = np.stack(taps, axis=2).reshape(n, c * kh * kw, oh * ow)
    out = np.einsum("ok,nkp->nop", w.reshape(o, -1), cols) + b[None, :, None]
    return out.reshape(n, o, oh, ow)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--act", choices=["sigmoid", "relu"], default="sigmoid")
    ap.add_argument("--pool", choices=["avg", "max"], default="avg")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--count", type=int, default=2000)
    a = ap.parse_args()
    p = load_file(a.checkpoint)
    images = idx(f"{a.data}/t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = idx(f"{a.data}/t10k-labels-idx1-ubyte.gz", 8)
    act = (lambda v: 1 / (1 + np.exp(-v))) if a.act == "sigmoid" else (lambda v: np.maximum(v, 0))

    def pool(v):
        n, c, h, w = v.shape
        v = v.reshape(n, c, h // 2, 2, w // 2, 2)
        return v.max(axis=(3, 5)) if a.pool == "max" else v.mean(axis=(3, 5))

    x = images[: a.count].astype(np.float32) / 255
    h = pool(act(conv(x, p["0.weight"], p["0.bias"], 2)))
    h = pool(act(conv(h, p["3.weight"], p["3.bias"], 0))).reshape(len(x), -1)
    h = act(h @ p["7.weight"].T + p["7.bias"])
    h = act(h @ p["9.weight"].T + p["9.bias"])
    z = h @ p["11.weight"].T + p["11.bias"]
    print(f"accuracy on the first {len(x)} test images: {(z.argmax(1) == labels[: len(x)]).mean():.4f}")
    e = np.exp(z[0] - z[0].max())
    e /= e.sum()
    print("image 0 top-3 (class, probability):", [(int(k), round(float(e[k]), 3)) for k in np.argsort(-e)[:3]])


if __name__ == "__main__":
    main()
