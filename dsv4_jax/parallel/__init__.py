"""The model split over a device mesh (docs/CODE_MAP.md, README "Multi-host").

* ``mesh``         meshes from ``--mesh data=…,expert=…,tensor=…``
* ``rules``        logical axis names → mesh axes (the one table), ``Layout``
* ``moe_ep``       expert-parallel MoE (two all-to-alls)
* ``dp_attention`` data-parallel attention: each sequence's state on one shard
* ``slots``        slot-table reads and writes on that split state (penalties, snapshots)
"""
