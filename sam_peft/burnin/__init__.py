"""The data-driven selection workflow: the burn-in at θ0 (options, batches, statistics), `select_parameters`,
`SelectionReport` and the Trainer callback `SAMCallback`."""
