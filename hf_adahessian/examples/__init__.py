"""The example scripts' tooling: model builder, offline metrics, demo data, script support (the [examples] extra)."""
