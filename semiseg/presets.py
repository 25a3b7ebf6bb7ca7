"""Built-in presets are YAML files under benchmarks/; see semiseg.bench."""
