"""meshplan.planner: the cost model and the search. Pure Python: never imports torch."""
