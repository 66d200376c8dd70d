"""The README's picture: a run's --eval --plot sample grid (true showers above generated ones, same particles)
stacked over its channel-sum histograms, as one small PNG.

    python tools/showcase.py runs/RUN/eval.grid.png runs/RUN/eval.hist.png docs/showers.png
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if len(sys.argv) != 4:
    sys.exit(__doc__)
grid, hist = plt.imread(sys.argv[1]), plt.imread(sys.argv[2])
w = max(grid.shape[1], hist.shape[1])
fig, axes = plt.subplots(2, 1, figsize=(w / 100, (grid.shape[0] + hist.shape[0]) / 100),
                         gridspec_kw=dict(height_ratios=[grid.shape[0], hist.shape[0]]))
for ax, img in zip(axes, (grid, hist)):
    ax.imshow(img)
    ax.axis("off")
fig.subplots_adjust(0, 0, 1, 1, 0, 0)
fig.savefig(sys.argv[3], dpi=70)
print(f"wrote {sys.argv[3]}")
