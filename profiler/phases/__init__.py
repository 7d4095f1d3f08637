"""The phases of the profiling job (:mod:`meshplan.profiler.worker` runs them in order on every rank at once):
``compute`` (blocks, GEMMs, attention, vocabulary ops, optimizer, layer memory), ``host`` (sharing, meeting,
pipeline ops; CPU ranks only), ``links`` (links sweep, reduction, overlap, pairs), and ``timing``, the helpers
they share."""
