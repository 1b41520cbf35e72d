"""Run recipes (TOML), shipped inside the package as kdcli.presets."""
