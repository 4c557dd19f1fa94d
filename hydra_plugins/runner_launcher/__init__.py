"""The runner's Hydra launcher plugin (see gpu_pool_launcher.py)."""
