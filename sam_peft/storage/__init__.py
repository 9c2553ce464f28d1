"""Files and identity: base fingerprints, validation, safetensors I/O, `SparseDelta`, packing, adapter directories."""
