#!/usr/bin/env python3
"""What stale every-step updates would cost: `bench/e2e/staleness.py 0 1 2 4`.

Trains bench e2e's job (examples/charlm, AdamW lr 3e-3, 200 steps, the same
seeds and batches as `./strait bench e2e`) in one process on both sites'
batches, applying the mean of the two sites' gradients d steps late (zero
gradients for the first d steps) — what pipelining steps to hide a round
trip would do. d = 0 is run (a), torch DDP, step for step. Prints the final
training loss (mean of the last 10 steps, both sites) and the held-out
next-byte accuracy, scored as bench/e2e/run.py scores. No network, no root.
"""

import collections
import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples", "charlm"))
import train as charlm  # noqa: E402

SITES = ("hangzhou", "singapore")


def run(delay, steps=200):
    torch.manual_seed(0)  # the workers' seed: the same initial weights
    model = charlm.CharLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    texts = [charlm.site_text(s)[0] for s in SITES]
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(SITES))]
    late = collections.deque()
    losses = []
    for _ in range(steps):
        mean, step_losses = None, []
        for text, g in zip(texts, gens):
            x, y = charlm.batch(text, 16, model.context, g)
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
            loss.backward()
            step_losses.append(loss.item())
            grads = [p.grad / len(SITES) for p in model.parameters()]
            mean = grads if mean is None else [a + b for a, b in zip(mean, grads)]
        late.append(mean)
        losses.append(sum(step_losses) / len(step_losses))
        applied = late.popleft() if len(late) > delay else [torch.zeros_like(p) for p in model.parameters()]
        for p, g in zip(model.parameters(), applied):
            p.grad = g
        opt.step()
    correct = total = 0
    with torch.no_grad():
        for site in SITES:
            held = charlm.site_text(site)[1]
            g = torch.Generator().manual_seed(1234)
            for _ in range(8):
                x, y = charlm.batch(held, 32, model.context, g)
                correct += (model(x).argmax(-1) == y).sum().item()
                total += y.numel()
    return sum(losses[-10:]) / 10, 100 * correct / total


def main():
    torch.set_num_threads(1)
    delays = [int(a) for a in sys.argv[1:]] or [0, 1, 2, 4]
    for d in delays:
        loss, acc = run(d)
        print(f"delay {d}: final loss {loss:.4f}, held-out accuracy {acc:.2f}%", flush=True)


if __name__ == "__main__":
    main()
