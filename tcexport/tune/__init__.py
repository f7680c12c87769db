"""`tcexport tune`: search the compression plan that keeps the most fidelity under a measured budget.

    budget.py       --budget flops=0.75 | tokens=0.75 | latency=0.70, parsed and checked up front
    calibration.py  the user's data (.npz, a text file, a folder of images) as model feeds, split search/held-out
    space.py        plan shapes (method, blocks, profile) from the model's blocks; intensity solved to the budget
    objective.py    one plan: compress in memory, measure its budget, its fidelity vs the uncompressed model (ORT)
    remote.py       the same fidelity evaluation as Ray tasks (--ray), the model shipped once
    search.py       the optuna study with a structured start; Ctrl-C keeps the best plan found
    outputs.py      best recipe YAML, pareto.json + plot, trials.jsonl, held-out fidelity
"""
