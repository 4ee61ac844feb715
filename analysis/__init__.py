"""Analysis: the paper's figures and numbers from any tokenizer checkpoint.

Extract once, plot from arrays (DESIGN §1 "Analysis in the paper", STYLE "Analysis"):

- :mod:`analysis.extract` is the only module that loads a checkpoint; it writes one cached ``.npz``.
- :mod:`analysis.tsne`, :mod:`analysis.depth_curves`, :mod:`analysis.kmeans` and :mod:`analysis.tables`
  are pure functions from arrays (or metrics.json dicts) to matplotlib Figures / table text.
- :mod:`analysis.probes`: linear probes, NMI and a crossover detector for every feature view
  (z_l, q_l, semantic decoder output, teacher tokens of the reconstruction; mean / max / foreground pooled
  and per position), from the same arrays.
- :mod:`analysis.plotting` saves a Figure as PNG + PDF.
- :mod:`analysis.make_figures` wires them together for one or many run folders.

Importing this package imports no torch and no scikit-learn; each module imports what it needs.
"""

__all__ = ["extract", "tsne", "depth_curves", "kmeans", "tables", "plotting", "probes", "make_figures"]
