"""Several processes: collectives and shards (DDP, FSDP2), with FSDP2 and DDP internals kept in one place."""
