"""The embedded default models: the colored-digits data, the recipe that trains them, the loader."""
