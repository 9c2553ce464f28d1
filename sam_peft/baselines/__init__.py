"""The paper's baselines that are not a fixed sparse delta: Mixout, DiffPruning, ChildPruning and DPS.

Each trains the dense model with a rule of its own (see each module); `sam_peft.methods` wires them, with
the sparse-delta methods, LoRA and bottleneck adapters, into the one training path.
"""
