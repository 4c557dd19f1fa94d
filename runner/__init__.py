"""A config-driven experiment runner for loss-minimization research (SAM and kin, losses, optimizers)."""

__version__ = "0.1.0"
