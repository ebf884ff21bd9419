"""``alps-ds demo``: ALPS end to end on a tiny model, from a synthetic task family to a five-arm comparison table.

- :mod:`~alps_ds.demo.tasks`: the task family (rows and the word-level tokenizer);
- :mod:`~alps_ds.demo.config`: every size, step count and seed of a run (``DemoConfig``);
- :mod:`~alps_ds.demo.ranks`: the pipeline every rank runs (pre-train, task model, localize, arms);
- :mod:`~alps_ds.demo.report`: the table and the verdict line.
"""
