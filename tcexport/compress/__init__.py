"""`tcexport compress`: plan which method runs at which block, rewrite the graph, check it, record it."""
