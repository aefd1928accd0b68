"""Adaptive compression (`compression.adaptive` in the job config): the site
leader chooses `topk(density) -> int<bits>` for each step (every-step mode)
or each sync (DiLoCo, strait/diloco.py) so that the exchange hides behind
compute.

Each step the hook measures how long the leader waited for the step's rounds
after the last bucket was handed over (`wait`), and the compute time since the
previous step's exchange ended (`compute`). The part of the wait that bytes
can change is `wait - latency`, where latency is the smallest wait seen so
far (a round trip no compression can shorten). If that part exceeds a
tenth of compute for `patience` steps in a row, the next step sends less (one
level sparser or fewer bits); if it stays under a fortieth as long, it sends
more. (Without the patience it flipped between two neighbouring levels on
the end-to-end benchmark: 106 changes in 200 steps.) It never goes below min_density or
min_bits: the quality floor. Payloads describe themselves, so each site
decides alone and every site still decodes the same bits.
"""

import math


class AdaptiveCompression:
    def __init__(self, min_density=0.001, max_density=0.1, min_bits=4, hide=0.1, patience=3):
        if not (0 < min_density <= max_density <= 1):
            raise ValueError(f"adaptive: need 0 < min_density ({min_density}) <= max_density ({max_density}) <= 1")
        if min_bits not in (2, 4, 8):
            raise ValueError(f"adaptive: min_bits = {min_bits}: must be 2, 4 or 8")
        densities, d = [], max_density
        while d > min_density * (1 + 1e-9):
            densities.append(d)
            d /= 2
        densities.append(min_density)
        bits = [b for b in (8, 4, 2) if b >= min_bits]
        # Levels from the most bytes to the fewest: value bits plus about
        # log2(1/d) + 2 bits of index per kept value.
        cost = lambda d, b: d * (b + math.log2(1 / d) + 2)  # noqa: E731
        self.levels = sorted(((d, b) for d in densities for b in bits), key=lambda x: -cost(*x))
        self.level = 0
        self.hide = hide
        self.latency = None
        self.patience = patience
        self.over = self.under = 0  # consecutive steps above / below the thresholds

    @property
    def pipeline(self):
        d, b = self.levels[self.level]
        return f"topk({d:.6g}) -> int{b}"

    def update(self, wait_s, compute_s):
        """Feeds one step's measurements; returns a sentence describing the
        decision if the level changed, else None."""
        self.latency = wait_s if self.latency is None else min(self.latency, wait_s)
        exposed = wait_s - self.latency
        before = self.pipeline
        self.over = self.over + 1 if exposed > self.hide * compute_s else 0
        self.under = self.under + 1 if exposed < self.hide * compute_s / 4 else 0
        if self.over >= self.patience and self.level + 1 < len(self.levels):
            self.level += 1
            why = "more than"
        elif self.under >= self.patience and self.level > 0:
            self.level -= 1
            why = "under"
        else:
            return None
        self.over = self.under = 0
        return (f"{before} -> {self.pipeline} (exchange beyond latency {exposed * 1000:.1f} ms, {why} "
                f"{'a tenth' if why == 'more than' else 'a fortieth'} of compute {compute_s * 1000:.1f} ms "
                f"for {self.patience} steps)")
