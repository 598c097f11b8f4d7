import train  # noqa: F401  (checks that data, model and eval are this project's packages: train/__init__.py)
