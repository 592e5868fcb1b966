"""The demo wing: seeding the demo campaign, simulated labelers, and the demo policy with its tasks.

demo_tasks and policy never import Django (the engine's rule judges and its default policy come from
them); seed, simulate and the management commands are the Django side."""
