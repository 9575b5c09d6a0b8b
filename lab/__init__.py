"""The composition package: the only code that combines apps.

Benchmarks (``fedex bench ...``), the main job (``fedex demo``), the FedAvg baseline
(server, devices and the side-by-side comparison), chaos runs and the report renderer
with its plots. Results go to ``bench/results/`` beside it. The product packages
(``pipeline``, ``agents``, ``trainer``, ``device_sim``) never import it.
"""
