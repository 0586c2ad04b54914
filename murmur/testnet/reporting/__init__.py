"""The pieces of a testnet report (see :mod:`murmur.testnet.report`).

``run``      what a report is made from (:class:`~.run.RunData`) and the series
             derived from the nodes' metrics rows: the run's quality metric,
             restart-corrected byte counters and rates, phase times, spread
             of the metric across nodes, events placed on both axes
``figures``  matplotlib helpers: one figure per plot, events drawn on every
             round or time axis, legends that stay readable with many nodes
``panels``   one :class:`~.panels.Panel` per plot: the table behind it (the
             CSV) and how it is drawn, and when it applies
``page``     the report's ``index.html``: summary, settings, nodes, events, plots
"""
