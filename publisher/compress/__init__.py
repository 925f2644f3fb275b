"""Post-training palettization: exact 1-D k-means LUTs from fp16 histograms, packed indices, fidelity reports."""
