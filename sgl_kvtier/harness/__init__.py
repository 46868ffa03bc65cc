"""What runs SGLang servers for demos, tests and evaluations (not part of serving).

``models`` converts the embedded model, ``model_shapes`` writes dummy-weights shapes,
``resolve`` names either, ``prompts`` builds token prompts, ``server`` starts and queries a
server, ``demo`` is ``scripts/demo.sh``, ``tier_bench`` measures the chunk store's reads.
"""
