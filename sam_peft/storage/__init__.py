"""Files and identity: state-dict keys, base fingerprints, validation of what is read, atomic safetensors I/O."""
