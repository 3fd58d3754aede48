"""SkyPilot task YAML recipes shipped with llm-atc (the package ``llm_atc.recipes``)."""
