"""Which entries to keep, as pure algorithms on tensors: the selection signals, entry budgets and exact top-k
(in one process or across shards)."""
