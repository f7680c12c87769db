"""YAML recipes: export -> compress -> validate -> build -> bench in one run."""
