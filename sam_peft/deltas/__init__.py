"""Task deltas outside peft: `SparseDelta` (extract, apply / remove in place, combine, save), packing parameters
for fast switching, and reading saved adapter directories without a model."""
