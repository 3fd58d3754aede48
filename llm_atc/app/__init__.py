"""The one place that sequences spec → render → backend → registry, for serving and training, on a
cluster, as a managed job, as a SkyPilot service and on this machine.

    serve.py / train.py   everything checked and rendered: a Workload and what is known of it
    launch.py             recorded, launched, waited for or followed, on every backend (and signals)
    lifecycle.py          what became of it (one reconcile for every kind of record), logs,
                          endpoints, stop and down

The CLI (``llm_atc.commands``) and the Python API (``llm_atc.api``) call these and render the
results; nothing else talks to a backend or writes the registry.
"""
