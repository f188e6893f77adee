"""Throughput benchmark of the training recipe on the prepared data (the ``benchmark`` rule).

One run measures, on the same utterances: training throughput for each precision x process count
(Horovod ranks under ``horovodrun``), scaling efficiency, batching strategies and their padding, the
data-loading share of a step, peak memory with and without gradient checkpointing, GPU utilization
(on a GPU) and data-prep throughput against parallel workers; then writes markdown tables in the
reference post's format, a JSON report and a bar chart.

Modules: ``worker`` (one rank's timed training steps, reusing the trainer), ``throughput``,
``padding``, ``memory``, ``gpu``, ``prep_scaling``, ``device``, ``table`` (report and chart) and
``runner`` (runs the worker processes and assembles the report).
"""
