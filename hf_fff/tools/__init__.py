"""The user tools behind `hf-fff`: conversion, publishing (hub, model cards, remote code), benchmarks, demo, environment.

Nothing here is imported by `import hf_fff`; the CLI and `hf_fff.convert` / `hf_fff.push_to_hub` load them on use.
"""
