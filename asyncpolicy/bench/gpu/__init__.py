"""`python -m asyncpolicy bench gpu`: the GPU path's figures (vLLM generation, weight sync, FSDP2
training, async vs sync through the Supervisor, learning), one section each.

settings.py (what runs, its sizes), model_dir.py (the model), engines.py (the factory the sections
take; vLLM + FSDP2), fakes.py (the CPU stand-ins), sections.py (the measurements), learn.py (time to accuracy of a real model, on-policy vs stale), table.py
(the summary), cli.py (the command line).
"""
