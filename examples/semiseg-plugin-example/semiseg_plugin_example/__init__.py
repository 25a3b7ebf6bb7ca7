"""An example semiseg plugin package. The registrations live in :mod:`semiseg_plugin_example.plugin`."""

__version__ = "0.1.0"
