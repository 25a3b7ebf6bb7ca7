"""Built-in benchmark presets: the YAML files under benchmarks/presets/ (see semiseg.bench.presets)."""

from semiseg.bench.presets import register_builtin_presets

register_builtin_presets()
