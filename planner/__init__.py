"""meshplan.planner: the cost model and the search. Pure Python: never imports torch.

search.py runs the search; evaluate.py predicts one configuration by composing the cost-model modules it lists.
"""
