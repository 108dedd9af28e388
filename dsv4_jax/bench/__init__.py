"""Benchmark and measurement library the scripts call (thin scripts, logic here).

* ``checkpoints``  random checkpoints in the published native format, at named sizes
* ``numerics``     the numerics report: serving configurations against float32 and the HF port
"""
