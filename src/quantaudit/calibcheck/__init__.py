"""``quantaudit calib-check``: per format, what the choice of calibration set and its size cost in KLD.

``command`` runs it (settings, the set x format measurement, the sample-count curves, terminal tables);
``verdict`` says what the paired measurements support; ``coverage`` holds the explanations (activation-range
and token coverage of the eval text by each set). The Markdown and HTML renderings live in
:mod:`quantaudit.report.calibcheck`.
"""
