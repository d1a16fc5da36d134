"""Array operations shared by several layers (data and evaluation)."""
