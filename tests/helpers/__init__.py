"""Test helpers shared by several test modules: self-made shards, shrunk fit arguments (import as `helpers.<name>`)."""
