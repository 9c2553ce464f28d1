"""Choosing the entries: signals and budgets, exact top-k, the burn-in at θ0, and the Trainer callback."""
