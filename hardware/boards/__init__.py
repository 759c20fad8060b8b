"""Built-in board profiles (TOML data files; a package so installs ship them as package data)."""
