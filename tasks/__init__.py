"""Problem definitions: where the data comes from and what a sample means."""
